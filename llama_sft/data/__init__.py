"""SFT data as training sees it: records, prompt formats, tokenization with masked prompts, collators."""
