"""Print and save what the GPU suite runs on: Python and package versions, driver, device.

    python bench/gpu/versions.py OUT_FILE

Exit status 1 if a package the suite needs is missing (the rest is still printed and saved).
"""
import importlib.metadata
import os
import platform
import subprocess
import sys

NEEDED = ("torch", "triton", "numpy", "tokenizers", "safetensors", "tqdm", "matplotlib", "pytest")
OPTIONAL = ("transformers", "hypothesis", "datasets", "pyarrow", "wandb")


def version(name):
    """The installed distribution's version, from its metadata (importing transformers or
    datasets would take seconds)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "MISSING"


def main(path):
    lines = [f"python {platform.python_version()} ({sys.executable})",
             f"platform {platform.platform()}"]
    versions = {name: version(name) for name in NEEDED + OPTIONAL}
    lines += [f"{name} {v}" for name, v in versions.items()]
    import torch
    import triton
    lines.append(f"imported: torch {torch.__version__} (cuda {torch.version.cuda}, available: "
                 f"{torch.cuda.is_available()}), triton {triton.__version__}")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.append(f"device {props.name}, {props.total_memory / 2**30:.0f} GiB, "
                     f"{props.multi_processor_count} SMs, capability {props.major}.{props.minor}")
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        lines.append(f"nvidia-smi: {smi.stdout.strip() or smi.stderr.strip()}")
    except (OSError, subprocess.TimeoutExpired) as e:
        lines.append(f"nvidia-smi: not available ({type(e).__name__})")
    lines.append(f"PYTHONPATH={os.environ.get('PYTHONPATH', '')}")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    missing = [n for n in NEEDED if versions[n].startswith("MISSING")]
    if missing:
        print(f"missing: {', '.join(missing)}", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/gpu/versions.py OUT_FILE")
    sys.exit(main(sys.argv[1]))
