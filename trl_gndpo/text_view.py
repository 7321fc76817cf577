"""The text view of a generation batch: each prompt with its image and video parts removed, through the student's chat
template. Text-only teachers of a vision-language student score it (cross-modal distillation, `teachers.py`), and
Visual Gradient Steering contrasts it with the image view (`vgs_steering.py`)."""

import torch
from trl.data_utils import prepare_multimodal_messages
from trl.trainer.utils import pad

# Content blocks that the text view removes.
_VISUAL_PARTS = ("image", "video")


class TextView:
    """Renders the text view of prompts like the student renders its own (template, template kwargs, pad token)."""

    def __init__(self, processing_class, chat_template, chat_template_kwargs: dict, pad_token_id: int, device):
        self.processing_class, self.chat_template = processing_class, chat_template
        self.chat_template_kwargs, self.pad_token_id, self.device = chat_template_kwargs, pad_token_id, device

    def prompts(self, inputs: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """The text view of the rows' prompts: left-padded ids and mask (so completion positions line up with the image
        view once the completions are appended), on the training device."""
        prompts = [
            [
                {**message, "content": [part for part in message["content"] if part.get("type") not in _VISUAL_PARTS]}
                for message in prepare_multimodal_messages(x["prompt"])
            ]
            for x in inputs
        ]
        tokenized = self.processing_class.apply_chat_template(
            conversation=prompts,
            chat_template=self.chat_template,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            **self.chat_template_kwargs,
        )
        rows = [torch.as_tensor(row) for row in tokenized["input_ids"]]
        prompt_ids = pad(rows, padding_value=self.pad_token_id, padding_side="left").to(self.device)
        prompt_mask = pad([torch.ones_like(row) for row in rows], padding_value=0, padding_side="left").to(self.device)
        return prompt_ids, prompt_mask
