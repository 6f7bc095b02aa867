"""``strategy.caption``: the schema section of the generative families (recipe ``captioning``). Re-exported by
:mod:`mmtl.config.schema` and :mod:`mmtl.config`."""
from __future__ import annotations

from typing import Optional

from pydantic import Field, model_validator

from mmtl.config.section import _Section


class CaptionConfig(_Section):
    """``strategy.caption`` (generative families, recipe ``captioning``): the caption target, the loss and the
    evaluation's decoding."""

    caption_field: Optional[str] = Field(None, description="Sample json key holding the target caption (emoji: "
                                         "'description', the CLDR name); null: the .txt caption.")
    keywords_field: Optional[str] = Field(None, description="Sample json key holding a keyword list appended as "
                                          "'caption: kw1, kw2' (emoji: 'keywords'); null: none.")
    conversations_field: Optional[str] = Field(None, description="llava: sample json key holding a chat-format "
                                               "conversation (LLaVA's 'conversations': [{from: human|gpt|system, "
                                               "value}], one <image>); the loss covers the assistant turns. null: "
                                               "image -> caption samples.")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    num_beams: int = Field(3, ge=1, description="Beam width of the evaluation's generation (1: greedy).")
    max_new_tokens: int = Field(24, ge=1)
    nn_baseline: bool = Field(True, description="Evaluate the nearest-neighbour caption baseline (Devlin et al. "
                              "2015) on the same split.")
    gallery: int = Field(16, ge=0, description="Images in the PNG gallery logged to MLflow (0: none).")
    retrieval_k: int = Field(0, ge=0, description="Retrieval-augmented captioning (SmallCap, Ramos et al. 2023; "
                             "blip): the decoder is prompted with the captions of the k training images nearest "
                             "by the frozen pretrained image tower's features (the nearest-neighbour baseline's); "
                             "training leaves each image itself out; the export carries the datastore. 0: off.")
    retrieval_prompt: str = Field("similar: {captions}. caption:", description="Retrieval prompt (input only, "
                                  "never in the loss); {captions}: the k retrieved captions, nearest first, joined "
                                  "by '. '. model.decoder.prompt, if any, follows it.")

    @model_validator(mode="after")
    def _retrieval_prompt_has_captions(self) -> "CaptionConfig":
        if self.retrieval_k and "{captions}" not in self.retrieval_prompt:
            raise ValueError(f"strategy.caption.retrieval_prompt={self.retrieval_prompt!r} needs a {{captions}} "
                             "field (retrieval_k > 0)")
        return self
