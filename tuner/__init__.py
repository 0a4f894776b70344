"""tuner: size, plan, build, serve and benchmark llama.cpp for the Qwen3.5 / Qwen3.6 hybrids."""

__version__ = "0.1.0"
