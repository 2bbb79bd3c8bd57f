# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""The model and what is added to it: the config (`config`), the LLaMA-architecture transformer (`model`), the
tokenizer (`tokenizer`), LoRA layers (`lora`), LLaMA-Adapter v1/v2 (`adapter`) and the no-answer head (`na_head`).
Their folders on disk are `lit_qa.checkpoints`' business.
"""
