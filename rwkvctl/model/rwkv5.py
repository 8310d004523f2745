"""RWKV-5.2 ("x052") language model: single-device PyTorch, RWKV-LM parameter names and shapes.

Two ways to run the same weights:
- `forward(idx, state)`: the parallel/sequence form used for training and prompt ingestion; WKV goes
  through `rwkvctl.kernels.wkv5` (compiled op or pure-PyTorch reference);
- `step(tokens, state)`: the one-token RNN form used for generation; the recurrence is written out
  here, independently of the kernels, so the two forms check each other.
Both take and return a `RecurrentState`, so a long sequence can be processed in segments.
On CPU, without autograd, `step` (and `forward` of a bf16 model) go through rwkvctl.model.cpu_fast, which this
module path stays the reference of (RWKVCTL_STEP=reference forces this path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from rwkvctl.config import ModelConfig
from rwkvctl.kernels import wkv5
from rwkvctl.model import cpu_fast
from rwkvctl.model.state import RecurrentState


def _token_shift(x: Tensor, prev: Tensor) -> Tensor:
    """x[t-1] for every t, with `prev` (B, C) standing in for the token before x[0]."""
    return torch.cat([prev.unsqueeze(1).to(x.dtype), x[:, :-1]], dim=1)


class TimeMix(nn.Module):
    """RWKV-5.2 attention replacement (RWKV_Tmix_x052)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        C, A, H, N = cfg.n_embd, cfg.dim_att, cfg.n_head, cfg.head_size
        self.time_mix_k = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_v = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.empty(1, 1, C))
        if cfg.gate:
            self.time_mix_g = nn.Parameter(torch.empty(1, 1, C))
        self.time_decay = nn.Parameter(torch.empty(H, N))
        self.time_faaaa = nn.Parameter(torch.empty(H, N))
        self.receptance = nn.Linear(C, A, bias=False)
        self.key = nn.Linear(C, A, bias=False)
        self.value = nn.Linear(C, A, bias=False)
        self.output = nn.Linear(A, C, bias=False)
        if cfg.gate:
            self.gate = nn.Linear(C, A, bias=False)
        self.ln_x = nn.GroupNorm(H, A, eps=1e-5)

    def _mix(self, x: Tensor, xx: Tensor, mix: Tensor) -> Tensor:
        return x * mix + xx * (1 - mix)

    def _project(self, x: Tensor, xx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        r = self.receptance(self._mix(x, xx, self.time_mix_r))
        k = self.key(self._mix(x, xx, self.time_mix_k))
        v = self.value(self._mix(x, xx, self.time_mix_v))
        return r, k, v

    def _gate(self, x: Tensor, xx: Tensor) -> Tensor | None:
        return F.silu(self.gate(self._mix(x, xx, self.time_mix_g))) if self.cfg.gate else None

    def _out(self, y: Tensor, g: Tensor | None) -> Tensor:
        # y: (..., A); GroupNorm wants (rows, A). Dividing by head_size_divisor before GroupNorm is what
        # RWKV-LM trains with (equivalent to eps = 1e-5 * hsd^2 on y).
        shape = y.shape
        y = self.ln_x(y.reshape(-1, shape[-1]) / self.cfg.head_size_divisor).view(shape)
        if g is not None:
            y = y * g
        return self.output(y)

    def forward(self, x: Tensor, shift: Tensor, wkv_state: Tensor, tail: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, T, C) -> (out (B, T, C), last x (B, C), wkv state (B, H, N, N)). `tail` > 0: out for the last
        `tail` positions only, (B, tail, C): the state needs every position, the gate and output projection not."""
        B, T, _ = x.shape
        H, N = self.cfg.n_head, self.cfg.head_size
        xx = _token_shift(x, shift)
        r, k, v = self._project(x, xx)
        # (B, T, A) -> (B, T, H, N) for the kernel
        y, wkv_state = wkv5(
            r.view(B, T, H, N), k.view(B, T, H, N), v.view(B, T, H, N), self.time_decay, self.time_faaaa, wkv_state
        )
        last, y = x[:, -1], y.reshape(B, T, H * N).to(x.dtype)
        if tail:  # (B, T, .) -> (B, tail, .)
            x, xx, y = x[:, -tail:], xx[:, -tail:], y[:, -tail:]
        return self._out(y, self._gate(x, xx)), last, wkv_state

    def step(self, x: Tensor, shift: Tensor, wkv_state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One token. x, shift: (B, C); wkv_state: (B, H, N, N) fp32."""
        B = x.shape[0]
        H, N = self.cfg.n_head, self.cfg.head_size
        # mixes are (1, 1, C): work on (B, 1, C) so they broadcast as in the sequence form
        x1, xx1 = x.unsqueeze(1), shift.to(x.dtype).unsqueeze(1)
        r, k, v = self._project(x1, xx1)
        g = self._gate(x1, xx1)
        g = g.squeeze(1) if g is not None else None
        r = r.float().view(B, H, N, 1)
        k = k.float().view(B, H, N, 1)
        v = v.float().view(B, H, 1, N)
        kv = k @ v  # (B, H, N_key, N_value)
        u = self.time_faaaa.float().view(1, H, N, 1)
        w = torch.exp(-torch.exp(self.time_decay.float())).view(1, H, N, 1)
        y = (r.transpose(-1, -2) @ (u * kv + wkv_state)).view(B, H * N)  # (B, H, 1, N) -> (B, A)
        wkv_state = kv + w * wkv_state
        return self._out(y.to(x.dtype), g), x, wkv_state


class ChannelMix(nn.Module):
    """RWKV-5 feed-forward (RWKV_CMix_x052): squared-ReLU with a receptance gate."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        C, Fd = cfg.n_embd, cfg.dim_ffn
        self.time_mix_k = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.empty(1, 1, C))
        self.key = nn.Linear(C, Fd, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(Fd, C, bias=False)

    def _ffn(self, x: Tensor, xx: Tensor) -> Tensor:
        xk = x * self.time_mix_k + xx * (1 - self.time_mix_k)
        xr = x * self.time_mix_r + xx * (1 - self.time_mix_r)
        return torch.sigmoid(self.receptance(xr)) * self.value(torch.relu(self.key(xk)) ** 2)

    def forward(self, x: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
        return self._ffn(x, _token_shift(x, shift)), x[:, -1]

    def step(self, x: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
        return self._ffn(x.unsqueeze(1), shift.to(x.dtype).unsqueeze(1)).squeeze(1), x


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        if layer_id == 0:  # RWKV-LM registers ln0 after ln1/ln2; order matters for identical .pth files
            self.ln0 = nn.LayerNorm(cfg.n_embd)
        self.att = TimeMix(cfg)
        self.ffn = ChannelMix(cfg)

    def forward(
        self, x: Tensor, att_shift: Tensor, ffn_shift: Tensor, wkv_state: Tensor, tail: int = 0
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """`tail` > 0: the output is needed for the last `tail` positions only (x out: (B, tail, C)); the state
        is the same. With tail >= 2 the last position's output is exact (its token shift is inside the tail)."""
        if self.layer_id == 0:
            x = self.ln0(x)
        a, att_shift, wkv_state = self.att(self.ln1(x), att_shift, wkv_state, tail)
        x = (x[:, -tail:] if tail else x) + a
        f, ffn_shift = self.ffn(self.ln2(x), ffn_shift)
        return x + f, att_shift, ffn_shift, wkv_state

    def step(
        self, x: Tensor, att_shift: Tensor, ffn_shift: Tensor, wkv_state: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if self.layer_id == 0:
            x = self.ln0(x)
        a, att_shift, wkv_state = self.att.step(self.ln1(x), att_shift, wkv_state)
        x = x + a
        f, ffn_shift = self.ffn.step(self.ln2(x), ffn_shift)
        return x + f, att_shift, ffn_shift, wkv_state


class RWKV5(nn.Module):
    """The full model. Parameters are created uninitialised: call `rwkvctl.model.init.init_weights`
    or load a state dict."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = False
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def _zero_state(self, batch: int, device: torch.device) -> RecurrentState:
        return RecurrentState.zeros(self.cfg, batch, device, self.emb.weight.dtype)

    def _run_blocks(
        self, x: Tensor, state: RecurrentState, one_token: bool, last_only: bool = False
    ) -> tuple[Tensor, RecurrentState]:
        """All blocks in sequence (x: (B, T, C)) or RNN (x: (B, C)) form, collecting each layer's new state."""
        att_shifts, ffn_shifts, wkvs = [], [], []
        last_block = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            args = (x, state.att_shift[i], state.ffn_shift[i], state.wkv[i])
            if one_token:
                x, a, f, s = block.step(*args)
            elif self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, a, f, s = checkpoint(block, *args, use_reentrant=False)
            elif last_only and i == last_block:
                # Nothing after the last block reads positions before the last, and the state needs only its
                # time-mix inputs and the last position: the last block's output projection and channel mix run
                # on 2 positions instead of T (a segment's state pass in training, a prompt in chat). Two, not
                # one, so that the last position's token shift in the channel mix is the real previous token.
                x, a, f, s = block(*args, tail=2)
            else:
                x, a, f, s = block(*args)
            att_shifts.append(a)
            ffn_shifts.append(f)
            wkvs.append(s)
        new_state = RecurrentState.from_layers(att_shifts, ffn_shifts, wkvs, like=state)
        if last_only:
            x = x[:, -1:]  # (B, T, C) -> (B, 1, C): a prompt only needs the next token's logits
        return self.head(self.ln_out(x)), new_state

    def forward(
        self, idx: Tensor, state: RecurrentState | None = None, *, last_only: bool = False
    ) -> tuple[Tensor, RecurrentState]:
        """idx: (B, T) token ids -> (logits (B, T, V), state after the last token). With `last_only` the logits
        are (B, 1, V), for the last position only: the head is a large share of a prompt's cost."""
        if idx.dim() != 2 or idx.shape[1] == 0:
            raise ValueError(f"idx must be (B, T) with T >= 1, got shape {tuple(idx.shape)}")
        if state is None:
            state = self._zero_state(idx.shape[0], idx.device)
        if cpu_fast.upcast_applies(self):
            return cpu_fast.forward_upcast(self, self.emb(idx), state, last_only)
        return self._run_blocks(self.emb(idx), state, one_token=False, last_only=last_only)

    def step(self, tokens: Tensor, state: RecurrentState | None = None) -> tuple[Tensor, RecurrentState]:
        """RNN mode, one token per sequence: tokens (B,) -> (logits (B, V), new state)."""
        if state is None:
            state = self._zero_state(tokens.shape[0], tokens.device)
        if cpu_fast.applies(self):
            return cpu_fast.fused_step(self, tokens, state)
        return self._run_blocks(self.emb(tokens), state, one_token=True)
