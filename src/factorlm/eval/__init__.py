"""Evaluation: perplexity (paper protocol), zero-shot multiple choice, inference speed."""

from factorlm.eval.api import evaluate
from factorlm.eval.perplexity import perplexity
from factorlm.eval.sources import load_texts
from factorlm.eval.speed import compare_speed, measure_speed
from factorlm.eval.zeroshot import zeroshot

__all__ = ["compare_speed", "evaluate", "load_texts", "measure_speed", "perplexity", "zeroshot"]
