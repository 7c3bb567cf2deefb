"""The engine's request limits (inference/request.py), mirrored for the add-on.

The add-on cannot import the engine (it needs torch), so these are a copy: the panel's
properties and the request checks read them from here, and tests/test_addon_limits.py
proves them equal to the engine's. The server checks every request again anyway, with a
message naming the field.
"""
MAX_PROMPT_CHARS = 1000
MAX_NAME_CHARS = 100
MAX_FOREGROUNDS = 8
MIN_SIZE, MAX_SIZE, SIZE_MULTIPLE = 256, 2048, 64
MIN_STEPS, MAX_STEPS = 1, 150
MIN_GUIDANCE, MAX_GUIDANCE = 0.0, 30.0
MAX_SEED = 2**32 - 1
METHODS = ("joint", "independent", "harmonized")
TTA_PASSES = (1, 2, 4, 8)
