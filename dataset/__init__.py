"""The shapes world data set: layouts and their checker (shapes_world), the caption language and its splits
(captions), colour names and the colour distance (colour_names, with their lists in data/), and the LLM features of
captions, computed once and cached (features). It sits on adapters/ and under training/ and evaluation/."""
