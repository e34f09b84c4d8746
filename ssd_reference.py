"""SSD, the state-space layer inside Mamba-2, written to be read.

Dao & Gu, "Transformers are SSMs" (ICML 2024). One head of the SSD layer maps an input sequence
x_t in R^P to y_t in R^P through a state h_t in R^{P x N}:

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t B_t^T          (the discretised SSM, paper eq. 1-2)
    y_t = h_t C_t + D * x_t

A < 0 is one scalar per head, dt_t > 0 is the input-dependent step size (already passed through
softplus), and B_t, C_t in R^N are shared by all heads of a group. Three ways to compute it:

- `ssd_step`: one step of the recurrence. This is what decoding runs, one token at a time.
- `ssd_sequential`: that step in a loop. Obviously right, O(L) sequential steps.
- `ssd_chunked`: the paper's chunked algorithm ("minimal SSD", Listing 1): split the sequence into
  chunks, use the quadratic (attention-like) form inside each chunk and the recurrence between
  chunks. The same numbers, with matrix multiplications instead of a long loop.

The fused Triton kernels of mamba-ssm compute `ssd_chunked`; `test_ssmttm.py` checks that they
agree with this file, and this file is what the model runs on a CPU.

Shapes: b batch, l length, h heads, p head dim, g groups (h % g == 0), n state size.
    x (b, l, h, p)   dt (b, l, h)   A (h,)   B, C (b, l, g, n)   D (h,)   state (b, h, p, n)
"""
import numbers

import torch
import torch.nn.functional as F


def _heads(BC, nheads):
    """(b, ..., g, n) -> (b, ..., h, n): every head of a group reads its group's B or C. ValueError
    unless the heads split evenly into the groups."""
    if nheads % BC.shape[-2]:
        raise ValueError(f"{nheads} heads do not split into {BC.shape[-2]} groups of B and C")
    return BC.repeat_interleave(nheads // BC.shape[-2], dim=-2)


def check_shapes(x, dt, A, B, C, D=None, initial_state=None, step=False):
    """ValueError naming the first argument whose shape does not fit x's (b, l, h, p), as the module
    docstring gives them: a tensor that would broadcast (an unbatched state, B of batch 1) is refused
    too, since the three ways would not all take it. step: ssd_step's shapes, the same without the l
    axis (x (b, h, p), dt (b, h), B, C (b, g, n)), its initial_state named `state`. TypeError naming the
    first argument of another dtype than x, or x that is not floating point: the three ways would not agree
    on mixed dtypes (a bf16 C beside fp32 x fails in an einsum of one and not of another, an fp64 D makes
    an fp64 y beside an fp32 state); the caller picks the precision (Mamba2.ssd: fp32 or above)."""
    seq, dims, state = ("", 3, "state") if step else ("l, ", 4, "initial_state")
    for name, t in (("x", x), ("B", B), ("C", C)):
        if t.dim() != dims:
            raise ValueError(f"{name} {tuple(t.shape)}: want (b, {seq}{'h, p' if name == 'x' else 'g, n'})")
    if B.shape != C.shape:
        raise ValueError(f"B {tuple(B.shape)} and C {tuple(C.shape)}: want one shape (b, {seq}g, n)")
    *bl, h, p = x.shape  # (b, l) or, for a step, (b,)
    g, n = B.shape[-2:]
    want = {"dt": (dt, (*bl, h)), "A": (A, (h,)), "B": (B, (*bl, g, n)), "D": (D, (h,)),
            state: (initial_state, (bl[0], h, p, n))}
    for name, (t, shape) in want.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} {tuple(t.shape)}: want {shape} for x {tuple(x.shape)} (b, {seq}h, p)")
    if not x.is_floating_point():
        raise TypeError(f"x {x.dtype}: want a floating-point dtype")
    for name, t in {"dt": dt, "A": A, "B": B, "C": C, "D": D, state: initial_state}.items():
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} {t.dtype} for x {x.dtype}: want x's dtype (convert them to one)")


def ssd_step(state, x, dt, A, B, C, D=None):
    """One recurrence step. state (b, h, p, n), x (b, h, p), dt (b, h), B, C (b, g, n).
    Returns y (b, h, p) and the new state. ValueError for shapes check_shapes(step=True) refuses (a state
    of batch 1 would be broadcast to every row; a check of shapes only, no GPU sync in decoding)."""
    check_shapes(x, dt, A, B, C, D, state, step=True)
    B, C = _heads(B, x.shape[1]), _heads(C, x.shape[1])
    decay = torch.exp(dt * A)                                      # exp(dt_t A)      (b, h)
    state = decay[..., None, None] * state + (dt[..., None] * x)[..., None] * B[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", state, C)                    # h_t C_t
    if D is not None:
        y = y + D[:, None] * x
    return y, state


def ssd_sequential(x, dt, A, B, C, D=None, initial_state=None):
    """The recurrence, one step at a time. Returns y (b, l, h, p) and the final state (l = 0: no
    output and a copy of the initial state). ValueError for shapes check_shapes refuses."""
    check_shapes(x, dt, A, B, C, D, initial_state)
    b, l, h, p = x.shape
    state = x.new_zeros(b, h, p, B.shape[-1]) if initial_state is None else initial_state.clone()
    ys = []
    for t in range(l):
        y, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        ys.append(y)
    return (torch.stack(ys, dim=1) if ys else x.new_empty(b, 0, h, p)), state


def segsum(a):
    """Segment sums of a (..., T): out[..., i, j] = a_{j+1} + ... + a_i for j <= i, -inf above.
    exp(segsum(dt A)) is the decay matrix L of the paper: L[i, j] = prod_{k=j+1..i} exp(dt_k A).
    Summing a masked copy (rather than differencing one cumsum) keeps it exact for long chunks."""
    T = a.shape[-1]
    a = a[..., None].expand(*a.shape, T)                             # a[..., i, j] = a_i
    a = a.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1), 0)
    out = a.cumsum(dim=-2)
    return out.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=a.device).tril(0), -torch.inf)


def check_chunk_size(chunk_size, name=None):
    """TypeError for a chunk_size that is not an integer (a bool neither), ValueError for one below 1;
    the message starts with the caller's name when one is given (ssd_grouped's checks are these)."""
    where = f"{name}: " if name else ""
    if not isinstance(chunk_size, numbers.Integral) or isinstance(chunk_size, bool):
        raise TypeError(f"{where}chunk_size {chunk_size!r}: want an integer")
    if chunk_size < 1:
        raise ValueError(f"{where}chunk_size {chunk_size}: want 1 or more")


def ssd_chunked(x, dt, A, B, C, chunk_size, D=None, initial_state=None):
    """The chunked SSD algorithm (Mamba-2 paper, section 6 and Listing 1), for any length.

    The sequence is cut into chunks of Q = chunk_size steps; the last one is padded with dt = 0,
    which makes a step the identity on the state (decay exp(0) = 1, input 0), so the final state
    is exact. Returns y (b, l, h, p) and the final state (b, h, p, n) (l = 0: no output and a copy
    of the initial state). TypeError for a chunk_size that is not an integer, ValueError for one below 1
    and for shapes check_shapes refuses."""
    check_shapes(x, dt, A, B, C, D, initial_state)
    check_chunk_size(chunk_size)
    b, l, h, p = x.shape
    n = B.shape[-1]
    pad = -l % chunk_size
    x_, dt_, B_, C_ = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    B_, C_ = _heads(B_, h), _heads(C_, h)
    c = (l + pad) // chunk_size
    X = (x_ * dt_[..., None]).reshape(b, c, chunk_size, h, p)              # dt_t x_t
    B_ = B_.reshape(b, c, chunk_size, h, n)
    C_ = C_.reshape(b, c, chunk_size, h, n)
    a = (dt_ * A).reshape(b, c, chunk_size, h).permute(0, 3, 1, 2)        # dt_t A   (b, h, c, Q)
    a_cumsum = a.cumsum(dim=-1)

    # 1. Diagonal blocks: inside a chunk the SSM is masked attention, y = (L o C B^T) X.
    L = torch.exp(segsum(a))                                               # (b, h, c, Q, Q)
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C_, B_, L, X)

    # 2. Chunk states: the state each chunk would leave behind if it started from zero.
    # exp(a_{s+1} + ... + a_{Q-1}): the last row of L, not exp(a_cumsum[-1] - a_cumsum), whose difference of
    # two large sums loses the digits of the small ones in fp32 (segsum's reason)
    decay_to_end = L[..., -1, :]                                           # (b, h, c, Q)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B_, decay_to_end, X)

    # 3. Inter-chunk recurrence: carry the state across chunk boundaries (a scan over c chunks).
    if initial_state is None:
        initial_state = x.new_zeros(b, h, p, n)
    states = torch.cat([initial_state[:, None], states], dim=1)           # (b, c+1, h, p, n)
    chunk_decay = torch.exp(segsum(F.pad(a_cumsum[..., -1], (1, 0))))      # (b, h, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    states, final_state = states[:, :-1], states[:, -1]

    # 4. State -> output: what the state entering each chunk contributes to that chunk.
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C_, states, torch.exp(a_cumsum))

    y = (y_diag + y_off).reshape(b, c * chunk_size, h, p)[:, :l]
    if D is not None:
        y = y + D[:, None] * x
    return y, final_state
