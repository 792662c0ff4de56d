"""``seq_lstm`` (CLIP4Clip "seqLSTM"): a one-layer LSTM over the frame embeddings.

frame embeds ``[B, T, E]`` -> LSTM (E -> E, one layer, unidirectional; packed by each clip's real-frame count)
-> residual add to the input frame embeds -> per-frame L2 normalisation (as CLIP4Clip does before its mean)
-> mean over the real frames. Without a video mask every clip has ``T`` real frames; with one
(``ctx.state["video_mask"]``, :mod:`.video_mask`) the LSTM never reads a padded slot and the mean leaves them
out, so a padded short clip embeds exactly as the short clip alone.

PyTorch's default LSTM initialisation, as CLIP4Clip (its weight init touches only Linear / Embedding /
LayerNorm), so the block is not the identity at init. The backbone is fine-tuned (CLIP4Clip's recipe).

Deviations from CLIP4Clip: its seqLSTM also creates a frame position table (copied from CLIP's text positions)
that its forward never uses; vidlang has none. Past a clip's length the official output slots hold the
input frame once or twice (zero padding up to the batch's longest clip, the input frames beyond it, plus the
residual); here they hold the input frame once. Those slots are masked out of the mean either way, so the
embedding is the same.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from vidlang.models.contract import HookContext, TemporalBlock, TowerSpec, VideoOutput
from vidlang.models.temporal.base import BLOCKS
from vidlang.models.temporal.video_mask import masked_mean, prefix_lengths, video_mask_of


@BLOCKS.register("seq_lstm")
class SeqLSTM(TemporalBlock):
    """CLIP4Clip's seqLSTM similarity head as a pooling block (module docstring)."""

    freeze_backbone = False
    uses_video_mask = True

    def __init__(self, spec: TowerSpec, normalize_frames: bool = True) -> None:
        super().__init__(spec)
        e = spec.embed_dim
        self.normalize_frames = normalize_frames
        self.lstm = nn.LSTM(input_size=e, hidden_size=e, num_layers=1, batch_first=True, bidirectional=False)

    def pool(self, frame_tokens: Tensor, frame_embeds: Tensor, ctx: HookContext) -> VideoOutput:
        b, t, _ = frame_embeds.shape
        mask = video_mask_of(ctx, b, t)  # [B, T] or None
        lengths = prefix_lengths(mask, b, t).cpu()  # [B]; pack_padded_sequence wants them on the CPU
        x = frame_embeds.to(self.lstm.weight_ih_l0.dtype)
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=t)  # [B, T, E], zeros past each length
        x = out.to(frame_embeds.dtype) + frame_embeds  # residual to the input frame embeddings
        if self.normalize_frames:
            x = F.normalize(x, dim=-1)
        return VideoOutput(embeds=masked_mean(x, mask), frame_embeds=x)
