"""What the GPU check runs on: torch version, CUDA, GPU name and capability (the check's first lines).

    python benchmarks/gpu_env.py cuda|cpu      (exit 1 when cuda is asked for and absent)
"""
import sys

import torch


def main(mode: str) -> int:
    cuda = torch.cuda.is_available()
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", cuda, flush=True)
    if cuda:
        print("gpu", torch.cuda.get_device_name(), "sm%d%d" % torch.cuda.get_device_capability(), flush=True)
    major_minor = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    print("torch 2.11 or newer:", major_minor >= (2, 11), flush=True)
    return 0 if cuda or mode == "cpu" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "cuda"))
