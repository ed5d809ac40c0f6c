"""Evaluation stage: perplexity, zero-shot multiple choice (lm-eval), needle retrieval, inference cost."""
