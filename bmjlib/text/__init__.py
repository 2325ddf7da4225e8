"""Step 03, text (paper §3, Fig. 2): report sections and findings, progression descriptions, LLM backends.

reports      MIMIC-style sections, the rule-based finding extractor, CheXpert-style labels
llm          LLM backends, the data-use guard, the answer cache
progression  the prompt, the offline synthesiser and the descriptions over pairs
"""
