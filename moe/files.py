"""File names of an exported model directory, in a module without heavy imports so that
preprocessing (which writes the tokenizer) and serving name the same files as `moe.checkpoint`."""

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
