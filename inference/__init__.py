"""The Multiplane engine: models, transparent VAE, generation methods, layer stacks.

Importing this package stays cheap (no torch); it only quiets the libraries' import-time
chatter (progress bars, optional-dependency notices) that would otherwise reach users.
"""
import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# Apple GPUs: ops without a Metal kernel run on the CPU instead of failing (read by torch at
# import, so it has to be set before torch is imported).
os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
