"""Data: tokenizers, the Megatron .bin/.idx writer and the built-in (no-download) training corpus."""
