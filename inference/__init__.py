"""The Multiplane engine: models, transparent VAE, generation methods, layer stacks.

Importing this package stays cheap (no torch); it only quiets the libraries' import-time
chatter (progress bars, optional-dependency notices) that would otherwise reach users.
"""
import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
