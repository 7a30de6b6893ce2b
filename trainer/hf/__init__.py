"""Hugging Face interop: `export` (checkpoint -> deepseek_v3 safetensors), `import_hf` (back),
`names` (the name and config mapping both use)."""
