"""The GPU benchmark (`bash bench/gpu/run.sh`): full-size random-weight SDXL in fp16 at 1024²."""
