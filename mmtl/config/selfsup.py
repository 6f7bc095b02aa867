"""``strategy.self_supervised``: the schema section of the ``self_supervised`` strategy. Re-exported by
:mod:`mmtl.config.schema` and :mod:`mmtl.config`."""
from __future__ import annotations

import math
from typing import Literal, Optional

from pydantic import Field, model_validator

from mmtl.config.section import _Section


class SelfSupervisedConfig(_Section):
    """``strategy.self_supervised`` (``strategy.kind: self_supervised``): adapt one tower on unpaired in-domain
    data before alignment. ``tower: text`` + ``method: mlm``: masked-language-model continued pretraining
    (Gururangan et al. 2020, "Don't Stop Pretraining"; BERT's 80/10/10 masking via transformers'
    ``DataCollatorForLanguageModeling``). ``tower: image`` + ``method: simclr``: SimCLR (Chen et al. 2020), NT-Xent
    over two augmented views per image made in the Ray Data map stage, with a projection MLP. ``tower: image`` +
    ``method: dino``: DINO self-distillation (Caron et al. 2021): an EMA teacher, multi-crop (2 global + ``local_crops``
    local views), centering and sharpening."""

    tower: Literal["image", "text"] = Field("text", description="The tower adapted (the other one is frozen).")
    method: Literal["mlm", "simclr", "dino"] = Field("mlm", description="mlm for the text tower; simclr or dino for "
                                                     "the image tower.")
    train_tower: bool = Field(True, description="false: train only the SSL head (MLM head / projector) on a "
                              "frozen tower: the baseline that separates the tower's adaptation from the head's.")
    mlm_probability: float = Field(0.15, gt=0, lt=1, description="Share of tokens selected for masking (BERT: 0.15).")
    min_text_tokens: Optional[int] = Field(None, ge=1, description="Texts with fewer tokens (without [CLS]/[SEP]) "
                                           "are skipped and counted as too_few_tokens; null: ceil(1 / "
                                           "mlm_probability), the length at which one token is masked on average.")
    temperature: float = Field(0.2, gt=0, description="NT-Xent temperature tau (SimCLR eq. 1).")
    proj_dim: int = Field(128, gt=0, description="SimCLR projection output width.")
    proj_hidden: int = Field(512, gt=0, description="SimCLR projection MLP hidden width.")
    crop_scale: tuple[float, float] = Field((0.2, 1.0), description="RandomResizedCrop area range of each view.")
    color_jitter: float = Field(0.4, ge=0, description="Colour jitter strength s (brightness/contrast/saturation "
                                "0.8s, hue 0.2s; applied with p=0.8).")
    grayscale_p: float = Field(0.2, ge=0, le=1, description="Probability of converting a view to grayscale.")
    flip: bool = Field(True, description="Random horizontal flips (off for data whose meaning flips, e.g. arrows).")
    dino_out_dim: int = Field(4096, gt=1, description="DINO: prototypes K of the head's last (weight-normalised) layer.")
    teacher_temp: float = Field(0.04, gt=0, description="DINO: teacher softmax temperature (sharpening).")
    student_temp: float = Field(0.1, gt=0, description="DINO: student softmax temperature.")
    teacher_momentum: float = Field(0.996, ge=0, lt=1, description="DINO: EMA momentum of the teacher at step 0, "
                                    "raised to 1 on a cosine schedule over train.max_steps.")
    center_momentum: float = Field(0.9, ge=0, lt=1, description="DINO: EMA momentum of the teacher-output center.")
    local_crops: int = Field(4, ge=0, description="DINO: local views per image (besides the 2 global ones).")
    local_size: Optional[int] = Field(None, ge=16, description="DINO: local view size in pixels; null: 3/7 of "
                                      "model.image_size (96 of 224, as DINO), at least 32.")
    global_scale: tuple[float, float] = Field((0.4, 1.0), description="DINO: RandomResizedCrop area range of the "
                                              "global views.")
    local_scale: tuple[float, float] = Field((0.05, 0.4), description="DINO: area range of the local views.")

    @model_validator(mode="after")
    def _method_fits_tower(self) -> "SelfSupervisedConfig":
        need = {"text": ("mlm",), "image": ("simclr", "dino")}[self.tower]
        if self.method not in need:
            raise ValueError(f"strategy.self_supervised.method={self.method!r} does not train the {self.tower} tower "
                             f"(use method: {' or '.join(need)})")
        for name in ("crop_scale", "global_scale", "local_scale"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"strategy.self_supervised.{name}={getattr(self, name)} must satisfy 0 < lo <= hi <= 1")
        return self

    def local_px(self, image_size: int) -> int:
        """DINO local view size: ``local_size``, or 3/7 of ``image_size`` (at least 32)."""
        return int(self.local_size or max(32, round(image_size * 3 / 7)))

    @property
    def min_tokens(self) -> int:
        """``min_text_tokens``, or ``ceil(1 / mlm_probability)`` when unset."""
        return self.min_text_tokens or math.ceil(1 / self.mlm_probability)
