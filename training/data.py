"""Training data: the shapes world's caption pool, drawn in a fresh layout per sample, or a folder of images with
same-name .txt captions."""
from __future__ import annotations

import os
import random

import torch

from dataset import captions, shapes_world


class ShapesData:
    """The training pool of dataset/captions.py (fixed captions: seen wordings, seen combinations), each sample
    drawn in a fresh layout that its caption is true of. open_color_pool: captions with colours beyond the seven
    (captions.SEEN_OPEN_COLORS), per caption of the seven-colour pool; open_color_share: of the samples drawn from
    them."""

    def __init__(self, pool_size: int, seed: int, resolution: int, mix: str = "0.3,0.2,0.2,0.15,0.15",
                 language: str = "full", open_color_pool: float = 0.0, open_color_share: float = 0.0):
        self.scenes = captions.training_pool(pool_size, seed=0, language=language)
        open_scenes = captions.training_pool(round(open_color_pool * pool_size), seed=0, language=language,
                                             open_colors=captions.SEEN_OPEN_COLORS) if open_color_pool else []
        self.captions = [s.caption for s in self.scenes + open_scenes] + [""]
        self.rng = random.Random(seed)
        self.resolution = resolution
        self.by_kind = {k: [i for i, s in enumerate(self.scenes) if s.kind == k] for k in captions.KINDS}
        self.open_by_kind = {k: [len(self.scenes) + i for i, s in enumerate(open_scenes) if s.kind == k]
                             for k in captions.KINDS}
        self.scenes += open_scenes
        self.open_share = open_color_share if open_scenes else 0.0
        self.mix = [float(w) for w in mix.split(",")]
        if len(self.mix) != len(captions.KINDS):
            raise SystemExit(f"--mix takes {len(captions.KINDS)} shares ({', '.join(captions.KINDS)}).")

    def sample(self, batch_size: int) -> tuple[torch.Tensor, list[int]]:
        kinds = self.rng.choices(captions.KINDS, weights=self.mix, k=batch_size)
        idx = [self.rng.choice((self.open_by_kind if self.open_share and self.rng.random() < self.open_share
                                else self.by_kind)[k]) for k in kinds]
        imgs = [shapes_world.render(captions.relayout(self.scenes[i], self.rng), self.resolution, self.rng)
                for i in idx]
        return torch.stack(imgs) * 2 - 1, idx  # pixel space in [-1, 1], as ComfyUI's pixel_space VAE expects


class FolderData:
    EXTS = (".png", ".jpg", ".jpeg", ".webp")

    def __init__(self, folder: str, seed: int, resolution: int):
        from PIL import Image
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(self.EXTS))
        self.items = []
        for f in files:
            txt = os.path.join(folder, os.path.splitext(f)[0] + ".txt")
            if os.path.exists(txt):
                self.items.append((os.path.join(folder, f), open(txt, encoding="utf-8").read().strip()))
        if not self.items:
            raise SystemExit(f"No image with a same-name .txt caption in '{folder}'.")
        self.captions = [c for _, c in self.items] + [""]
        self.rng = random.Random(seed)
        self.resolution = resolution
        self.Image = Image

    def image(self, i: int) -> torch.Tensor:
        """Image i, centre-cropped to the resolution: [3, H, W] in [0, 1]."""
        import torchvision.transforms.functional as TF
        img = self.Image.open(self.items[i][0]).convert("RGB")
        return TF.to_tensor(TF.center_crop(TF.resize(img, self.resolution), self.resolution))

    def sample(self, batch_size: int):
        idx = [self.rng.randrange(len(self.items)) for _ in range(batch_size)]
        return torch.stack([self.image(i) for i in idx]) * 2 - 1, idx
