"""The `hf` backend: a transformers SmolVLM (merged, or base + LoRA adapter) scoring the labels.

One forward pass over the label prompt and the photo; the answer is read from the next-token
log-probabilities of each label's first token (DESIGN §4). When two labels share a first token the
whole continuation of every label is scored instead. Nothing is ever generated.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from PIL import Image

from ..fileio import sha256_file
from ..images import model_input
from ..model_io import DEFAULT_LONGEST_EDGE, apply_geometry, load_model, load_processor, pick_device, vision_geometry
from ..task import Task
from .base import Prediction, prediction_from_scores


class HFClassifier:
    backend = "hf"

    def __init__(self, model, processor, task: Task, files: dict[str, str] | None = None):
        self.model = model
        self.processor = processor
        self.task = task
        self.labels = task.labels
        self._files = files or {}
        self.label_ids = task.label_token_ids(processor.tokenizer)
        self.first_token = task.first_tokens_unique(processor.tokenizer)
        self.prompt = task.prompt("label")

    @classmethod
    def from_path(
        cls,
        model_path: Path | str,
        task: Task,
        lora_path: Path | str | None = None,
        longest_edge: int | None = None,
        device: str | None = None,
    ) -> HFClassifier:
        """Load a merged model, or a base model plus a PEFT adapter, with the one-tile geometry.

        `longest_edge` None: the geometry the model was trained at, from the processor saved with it
        (merge and train save it), or 512 for a base model whose processor still tiles.
        """
        dev = pick_device(device)
        model = load_model(model_path, device=dev)
        files = _weight_files(Path(model_path))
        if lora_path is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(lora_path)).to(dev).eval()
            files.update(_weight_files(Path(lora_path)))
        saved = Path(lora_path) if lora_path is not None and (Path(lora_path) / "processor_config.json").is_file() \
            else model_path
        processor = load_processor(saved)
        if longest_edge is None and processor.image_processor.do_image_splitting:
            longest_edge = DEFAULT_LONGEST_EDGE
        if longest_edge is not None:
            apply_geometry(processor, longest_edge, vision_geometry(model_path))
        return cls(model, processor, task, files)

    @property
    def longest_edge(self) -> int:
        return int(self.processor.image_processor.size["longest_edge"])

    def model_files(self) -> dict[str, str]:
        return dict(self._files)

    @torch.no_grad()
    def label_logprobs(self, image: Image.Image) -> list[float]:
        """Log-probability of each label as the answer to the label prompt for `image`."""
        enc = self.processor(text=[self.prompt], images=[[model_input(image)]], return_tensors="pt")
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        enc = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in enc.items()}
        if self.first_token:
            logits = self.model(**enc).logits[0, -1].float()
            logp = torch.log_softmax(logits, dim=-1)
            return [float(logp[ids[0]]) for ids in self.label_ids]
        return self._continuation_logprobs(enc)

    def _continuation_logprobs(self, enc: dict[str, torch.Tensor]) -> list[float]:
        """Sum of token log-probs of each label's full continuation, one batched pass over the labels."""
        n = len(self.label_ids)
        prompt_ids = enc["input_ids"][0]
        longest = max(len(ids) for ids in self.label_ids)
        pad = self.processor.tokenizer.pad_token_id
        ids = torch.full((n, len(prompt_ids) + longest), pad, dtype=torch.long, device=prompt_ids.device)
        mask = torch.zeros_like(ids)
        for i, lab in enumerate(self.label_ids):
            k = len(prompt_ids) + len(lab)
            ids[i, : len(prompt_ids)] = prompt_ids
            ids[i, len(prompt_ids) : k] = torch.tensor(lab, device=ids.device)
            mask[i, :k] = 1
        pixel = {k: v.expand(n, *v.shape[1:]) for k, v in enc.items() if k.startswith("pixel")}
        logp = torch.log_softmax(self.model(input_ids=ids, attention_mask=mask, **pixel).logits.float(), -1)
        out = []
        for i, lab in enumerate(self.label_ids):
            start = len(prompt_ids) - 1
            out.append(sum(float(logp[i, start + j, t]) for j, t in enumerate(lab)))
        return out

    def classify(self, image: Image.Image) -> Prediction:
        t0 = time.perf_counter()
        scores = self.label_logprobs(image)
        return prediction_from_scores(self.labels, scores, (time.perf_counter() - t0) * 1000)


def _weight_files(folder: Path) -> dict[str, str]:
    if not folder.is_dir():
        return {}
    return {str(p): sha256_file(p) for p in sorted(folder.glob("*.safetensors"))}
