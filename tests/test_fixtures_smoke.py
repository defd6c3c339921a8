
from llama_sft.model.loading import load_base_model, load_tokenizer


def test_tiny_model_loads(tiny_model_dir):
    model = load_base_model(str(tiny_model_dir), dtype="float32")
    tok = load_tokenizer(str(tiny_model_dir))
    assert model.config.num_hidden_layers == 2
    assert tok.pad_token_id != tok.eos_token_id


def test_tiny_adapter_loads(tiny_adapter_dir):
    from llama_sft.model.loading import load_for_inference

    loaded = load_for_inference(tiny_adapter_dir, dtype="float32")
    assert loaded.prompt_format.style == "chat_template"
