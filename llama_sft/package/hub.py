"""Uploading a package to the Hugging Face Hub (the token is never printed)."""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from llama_sft.adapter.archive import extract_package
from llama_sft.errors import UsageError

log = logging.getLogger("llama_package")


def _default_hub_api():
    """An authenticated HfApi; the token is never printed."""
    from huggingface_hub import HfApi, get_token

    token = get_token()
    if not token:
        raise UsageError("--push-to-hub needs a Hugging Face token: run `hf auth login` "
                         "(or `huggingface-cli login`) or set HF_TOKEN")
    return HfApi(token=token)


def push_to_hub(archive: str | os.PathLike, repo_id: str, *, private: bool = True,
                api=None) -> str:
    """Upload the package's files (a loadable adapter repo) plus the archive and its checksum."""
    archive = Path(archive)
    api = api or _default_hub_api()
    with tempfile.TemporaryDirectory() as tmp:
        folder = extract_package(archive, tmp)
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                          commit_message=f"Add {folder.name}")
        for path in (archive, archive.with_name(archive.name + ".sha256")):
            api.upload_file(path_or_fileobj=str(path), path_in_repo=path.name, repo_id=repo_id,
                            repo_type="model", commit_message=f"Add {path.name}")
    log.info("pushed %s to https://huggingface.co/%s", folder.name, repo_id)
    return f"https://huggingface.co/{repo_id}"
