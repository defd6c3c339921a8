"""The package stage: build a package from an adapter, or verify or extract one."""
from __future__ import annotations

import logging
import sys

from llama_sft.adapter.archive import extract_package, verify_exports, verify_package
from llama_sft.errors import UsageError
from llama_sft.package import hub
from llama_sft.package.build import build_package


def run(args) -> int:
    """Verify, extract, or build (and optionally upload) a package."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    caps = {"max_bytes": args.max_bytes, "max_members": args.max_members}
    if args.verify:
        info = verify_package(args.verify, **caps)
        exports = verify_exports(info)
        print(f"ok: {args.verify}: {len(info['files'])} files, {info['bytes']} bytes; checksums "
              f"and allowlist verified (sha256 {info['sha256']}){exports}")
        return 0
    if args.extract:
        if not args.to:
            raise UsageError("--extract needs --to DIR")
        print(extract_package(args.extract, args.to, overwrite=args.overwrite, **caps))
        return 0
    if not args.adapter_path:
        raise UsageError("give --adapter-path DIR (to package), --verify PACKAGE or "
                         "--extract PACKAGE --to DIR")
    hub_api = hub._default_hub_api() if args.push_to_hub else None  # no token: fail before work
    archive = build_package(args.adapter_path, args.output_dir, base_model=args.base_model,
                            model_size=args.model_size, name=args.name, version=args.version,
                            evaluation=args.evaluation, merge=args.merge, gguf=args.gguf,
                            onnx=args.onnx, merge_dtype=args.merge_dtype)
    if hub_api is not None:
        hub.push_to_hub(archive, args.push_to_hub, private=not args.public, api=hub_api)
    print(archive)
    return 0
