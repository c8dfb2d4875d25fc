"""Adapters that plug `core.attention` into other libraries. Each lives in its own module and imports its
library only when used, so `import core` never needs them:

    import core.integrations.transformers
    core.integrations.transformers.register()   # attn_implementation="core" for Hugging Face models
"""
