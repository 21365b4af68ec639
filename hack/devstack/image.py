"""The environment the trainer image (Dockerfile.trainer) gives its processes, emulated for local pods.

A pod's env comes from its spec; an image adds its own ENV lines on top. With no container
runtime, the local pod runner adds these instead: where llama.cpp's converter lives (the image
has it at /opt/llama.cpp; here hack/bootstrap.sh caches it) and the shared model cache.
"""

from __future__ import annotations

from finetune_trainer.paths import cache_dir


def trainer_image_env() -> dict[str, str]:
    cache = cache_dir()
    env = {"FTO_CACHE": str(cache), "UNSLOTH_DISABLE_STATISTICS": "1",
           # no network here: never try a hub
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    recorded = cache / "env"  # written by hack/bootstrap.sh
    if recorded.exists():
        for line in recorded.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip():
                env[key.strip()] = value.strip()
    else:
        found = sorted(cache.glob("llama.cpp-*/convert_hf_to_gguf.py"))
        if found:
            env["LLAMA_CPP_CONVERTER_DIR"] = str(found[-1].parent)
    return env
