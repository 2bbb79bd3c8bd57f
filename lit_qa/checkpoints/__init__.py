# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Everything on disk about weights: checkpoint folders (`folder`), fine-tuned folders on top of a base
(`finetuned`, `lora`, `adapter`, `na_head`), GPTQ folders (`gptq`), loading for inference (`inference`), and
conversions from and to Hugging Face (`convert_hf`), Meta (`convert_meta`) and GGUF (`convert_gguf`).
"""
