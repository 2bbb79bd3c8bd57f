# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""SQuAD data: the official file format (`squad`), prompts (`prompts`), turning questions into token samples
(`prepare`) and reading prepared folders back in batches (`dataset`).
"""
