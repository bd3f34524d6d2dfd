"""Model definitions; one decoder covers the Llama, Mistral and Qwen2 families."""
