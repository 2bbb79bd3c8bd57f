# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Generation: batched KV-cache decoding (`generate`) and span-constrained decoding that keeps every answer a
substring of its context (`extractive`).
"""
