"""The package stage: build a package from an adapter, or verify or extract one."""
from __future__ import annotations

import logging
import sys

from llama_sft.adapter.archive import extract_package, verify_exports, verify_package
from llama_sft.errors import UsageError
from llama_sft.files import read_json
from llama_sft.package import hub
from llama_sft.package.build import build_package
from llama_sft.tracking import TrackedRun, log_package


def run(args) -> int:
    """Verify, extract, or build (and optionally upload, log to MLflow and register) a
    package."""
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
    tracked = None
    if args.mlflow or args.register_model:    # the training's MLflow run, found before any work
        flag = "--register-model" if args.register_model else "--mlflow"
        tracked = TrackedRun.for_adapter(args.adapter_path, flag)
    archive = build_package(args.adapter_path, args.output_dir, base_model=args.base_model,
                            model_size=args.model_size, name=args.name, version=args.version,
                            evaluation=args.evaluation, merge=args.merge, gguf=args.gguf,
                            onnx=args.onnx, merge_dtype=args.merge_dtype)
    if hub_api is not None:
        hub.push_to_hub(archive, args.push_to_hub, private=not args.public, api=hub_api)
    if tracked is not None:
        version = log_package(tracked, archive, register_as=args.register_model,
                              evaluation=read_json(args.evaluation) if args.evaluation else None)
        print(f"logged to MLflow run {tracked.run_id}" + (
            f"; registered {version.name} version {version.version}" if version else ""))
    print(archive)
    return 0
