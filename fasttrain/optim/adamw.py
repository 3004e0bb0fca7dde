"""Drop-in AdamW and Adam whose step is a few fused launches, whatever the number of tensors.

Same constructor, param groups and state_dict layout (``step``, ``exp_avg``, ``exp_avg_sq``,
``max_exp_avg_sq``) as ``torch.optim.AdamW``, so state_dicts go both ways. Keyword-only extras,
all off by default:

- ``max_grad_norm``: global gradient-norm clipping fused into the step (norm computed on the
  device over every group, no host sync; reduced across ranks for sharded DTensor params). The
  unscaled, unclipped norm of the last step is kept in ``optimizer.last_grad_norm`` (a step
  without any grad leaves it as it was; None before the first clipped step).
- ``master_weights=True``: low-precision params get an fp32 copy in the state
  (``master_param``) that the update runs on.
- ``stochastic_rounding=True``: bf16 params without a master copy are rounded stochastically
  (noise keyed on ``seed``, the step and the tensor; without ``seed=``, one is drawn from torch's
  RNG at the first step, or under torch.distributed rank 0's at construction: a broadcast on
  the default group that every rank must reach; pass ``seed=`` where not all ranks build one).
- ``state_dtype``: dtype of ``exp_avg``/``exp_avg_sq`` (default: like torch, the param's dtype,
  or fp32 with master weights). ``torch.bfloat16`` halves the state memory.
- ``backend``: ``"triton"``, ``"cuda"``, ``"cpu"``, ``"torch"`` or None (automatic; see
  fasttrain/_backend.py). ``FASTTRAIN_BACKEND`` sets it globally.

Works with ``torch.amp.GradScaler`` through the fused-optimizer protocol (the scaler sets
``grad_scale``/``found_inf``; inf/NaN gradients skip the step without a host sync).
"""
from __future__ import annotations

import array
import itertools
import operator
import os
from collections import defaultdict

import torch
from torch.optim import Optimizer

from fasttrain import _backend, _ext

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the kernels' param dtypes
_HALF_DTYPES = (torch.bfloat16, torch.float16)  # the ones master_weights keeps an fp32 copy of
_DOUBLE_DTYPES = (torch.float64, torch.complex128)  # computed in fp64 (torch backend)
_STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param")
_CONFIG = ("max_grad_norm", "master_weights", "stochastic_rounding", "state_dtype", "backend",
           "seed", "last_grad_norm", "_step_supports_amp_scaling", "_decoupled")

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed
    DTensor = None


class _ParamState(dict):
    """One param's state. A write of a key the kernels read (a state tensor or the step counter
    created, replaced or removed) is counted in ``counter``, its optimizer's, so that a step,
    which reuses the tensors it found before, sees it. Other keys are the user's own."""

    _READ = frozenset(_STATE_KEYS + ("step",))

    def __init__(self, entries=()):
        super().__init__(entries)
        self.counter = None  # the owning _State's, set when the entry is put there

    def __reduce__(self):  # pickles (and copies) as a plain dict: loadable without fasttrain
        return dict, (dict(self),)

    def _wrote(self, key=None):
        if self.counter is not None and (key is None or key in self._READ):
            self.counter[0] += 1

    def __setitem__(self, key, value):
        self._wrote(key)
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self._wrote(key)
        super().__delitem__(key)

    def __ior__(self, other):
        self._wrote()
        return super().__ior__(other)

    def clear(self):
        self._wrote()
        super().clear()

    def pop(self, key, *default):
        self._wrote(key)
        return super().pop(key, *default)

    def popitem(self):
        self._wrote()
        return super().popitem()

    def setdefault(self, key, default=None):
        if key not in self:
            self._wrote(key)
        return super().setdefault(key, default)

    def update(self, *args, **kwargs):
        self._wrote()
        super().update(*args, **kwargs)


class _State(defaultdict):
    """``optimizer.state``, a defaultdict whose entries are _ParamState. Every write to it (a
    param's state put, replaced, reset or deleted: ``opt.state[p] = {}``, ``clear()``) and every
    counted write to an entry bumps ``counter``, which the optimizer compares with the value
    its cached layouts were built at. ``state_dict()`` hands out plain dicts."""

    def __init__(self, *args, **kwargs):  # defaultdict's signature (copy() calls it so)
        super().__init__(dict)
        self.counter = [0]
        self.update(*args[1:], **kwargs)

    def __missing__(self, key):
        value = self[key] = _ParamState()
        return value

    def __reduce__(self):  # as a plain defaultdict (the optimizer wraps it again on load)
        return defaultdict, (dict,), None, None, iter(self.items())

    def __setitem__(self, key, value):
        self.counter[0] += 1
        if type(value) is dict:
            value = _ParamState(value)
        if isinstance(value, _ParamState) and value.counter is None:
            value.counter = self.counter
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self.counter[0] += 1
        super().__delitem__(key)

    def __ior__(self, other):
        self.update(other)
        return self

    def clear(self):
        self.counter[0] += 1
        super().clear()

    def pop(self, *args):
        self.counter[0] += 1
        return super().pop(*args)

    def popitem(self):
        self.counter[0] += 1
        return super().popitem()

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return self[key]

    def update(self, *args, **kwargs):
        for key, value in dict(*args, **kwargs).items():
            self[key] = value


def _local(t):
    """The local shard of a DTensor, else t. (isinstance on tensor types costs ~1 us through the
    tensor metaclass; the exact-type test first keeps the per-tensor cost of step() low.)"""
    if type(t) is torch.Tensor or type(t) is torch.nn.Parameter or DTensor is None:
        return t
    return t.to_local() if isinstance(t, DTensor) else t


def _mix(*values):
    """A 31-bit hash of integers (splitmix64's finalizer over a weighted sum)."""
    z = 0
    for k, v in enumerate(values):
        z = (z + int(v) * (0x9E3779B97F4A7C15 + 2 * k)) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFF


def _bucket_seed(seed, b):
    """The stochastic-rounding seed of one bucket. The kernels key their noise on (seed, step,
    index of the tensor in its bucket): mixing in the bucket's first param, (group, index),
    keeps tensors of different buckets on different streams, and for sharded DTensors the
    shard's coordinates on the mesh dims it is sharded over, the shards of one param (the
    ranks holding the same shard or a replicated param need the same noise)."""
    return _mix(seed, b.group_index, b.indices[0], *b.shard)


def _shard_of(p):
    """() for a plain or replicated param, else the coordinates of a DTensor's shard on the
    mesh dims it is not replicated over (the same on the ranks that hold the same shard)."""
    if DTensor is None or not isinstance(p, DTensor):
        return ()
    coordinate = p.device_mesh.get_coordinate()
    return tuple(coordinate[d] for d, pl in enumerate(p.placements) if not pl.is_replicate())


def _shared_seed(params):
    """A stochastic-rounding seed from torch's RNG: rank 0's under torch.distributed (a
    broadcast on the default group), so that replicated (DDP) params round alike on every rank
    however each rank's RNG was seeded. None outside torch.distributed: drawn at the first
    step, as before."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device="cpu")
    device = next((p.device for p in params if p.device.type == "cuda"), None)
    if device is None and dist.get_backend() == "nccl":
        # params on the CPU or meta (offloading, deferred init): NCCL needs this rank's GPU,
        # which the current device is not if set_device was not called
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK",
                                                         torch.cuda.current_device())))
    seed = seed.to(device or "cpu")
    dist.broadcast(seed, src=0)
    return int(seed.item())


class AdamW(Optimizer):
    """AdamW (decoupled weight decay). Arguments as ``torch.optim.AdamW``, plus the extras above."""

    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None, max_grad_norm=None, master_weights=False,
                 stochastic_rounding=False, state_dtype=None, backend=None, seed=None):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        for i, beta in enumerate(betas):
            if isinstance(beta, torch.Tensor):
                if beta.numel() != 1:
                    raise ValueError(f"Tensor betas[{i}] must be 1-element")
                beta = float(beta)
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if differentiable:
            raise ValueError("fasttrain AdamW does not support differentiable=True; "
                             "use torch.optim.AdamW for differentiable optimization")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(
                f"max_grad_norm must be a positive number or None, got {max_grad_norm}")
        if state_dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(f"state_dtype must be None, torch.float32 or torch.bfloat16, "
                             f"got {state_dtype}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize, foreach=foreach,
                        capturable=capturable, differentiable=False, fused=fused,
                        decoupled_weight_decay=self._decoupled)
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm
        self.master_weights = master_weights
        self.stochastic_rounding = stochastic_rounding
        self.state_dtype = state_dtype
        self.backend = _backend.requested(backend)
        self.seed = seed  # stochastic rounding's; drawn from torch's RNG when first needed
        params = [p for g in self.param_groups for p in g["params"]]
        if (stochastic_rounding and seed is None and not master_weights
                and any(p.dtype == torch.bfloat16 for p in params)):
            self.seed = _shared_seed(params)  # a collective under torch.distributed
        self.last_grad_norm = None
        # GradScaler calls step() directly and sets grad_scale / found_inf on the optimizer.
        self._step_supports_amp_scaling = True
        self._reset_caches()
        if self.backend is not None:
            for group in self.param_groups:
                for p in group["params"]:
                    reason = _unavailable_reason(self.backend, p.device)
                    if reason is not None:
                        raise RuntimeError(f"fasttrain AdamW: backend {self.backend!r} cannot run "
                                           f"for a parameter on {p.device}: {reason}")

    def _reset_caches(self):
        if type(self.state) is not _State:
            self.state = _State(None, self.state)
        self._tables = {}
        self._layouts = {}  # group index -> (group, has grad, amsgrad, params, buckets)
        self._generation = 0  # bumped whenever the layouts are dropped (a state write)
        self._seen = (None, None)  # (state dict, write count) the layouts were built from

    def __getstate__(self):  # pickling the optimizer itself keeps the extras
        state = super().__getstate__()
        state.update({key: self.__dict__[key] for key in _CONFIG if key in self.__dict__})
        return state

    def __setstate__(self, state):
        super().__setstate__(state)  # also how torch's load_state_dict installs the new state
        self._reset_caches()
        for group in self.param_groups:
            # AdamW, whatever the loaded groups say (as torch's AdamW); Adam, even one built with
            # decoupled_weight_decay=True, takes the loaded groups' switch (as torch's Adam)
            if type(self)._decoupled:
                group["decoupled_weight_decay"] = True
            else:
                group.setdefault("decoupled_weight_decay", False)
            for key in ("foreach", "fused"):
                group.setdefault(key, None)
            for key in ("amsgrad", "maximize", "capturable", "differentiable"):
                group.setdefault(key, False)

    def state_dict(self):
        out = super().state_dict()
        out["state"] = {k: dict(v) if isinstance(v, _ParamState) else v  # loadable without
                        for k, v in out["state"].items()}               # fasttrain
        return out

    def load_state_dict(self, state_dict):
        # torch casts every floating state to the param's dtype on load: restore fp32 master
        # copies and the configured state dtype from the source tensors, those of the dict that
        # torch loads (after the user's pre-hooks), before the user's post-hooks run.
        loaded = {}
        handles = [
            self.register_load_state_dict_pre_hook(lambda _, sd: loaded.update(sd=sd)),  # last
            self.register_load_state_dict_post_hook(
                lambda _: self._restore_loaded_state(loaded["sd"]), prepend=True)]
        try:
            super().load_state_dict(state_dict)
        finally:
            for handle in handles:
                handle.remove()

    def _restore_loaded_state(self, state_dict):
        # A state_dict from torch.optim.AdamW keeps `step` on the CPU (or as a number in old
        # ones): it moves where this optimizer's kernels read it.
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            state = self.state[p]
            for key in _STATE_KEYS:
                if key not in saved:
                    continue
                if key == "master_param" and (not self._has_master(p)
                                              or saved[key].dtype != torch.float32):
                    # fasttrain saves fp32 masters; another dtype means the dict went through
                    # torch.optim.AdamW, which casts it to the param's dtype and never updates
                    # it: the first step rebuilds it from the param (_init_state), which is
                    # also what a dict without one gets, once the model's weights are loaded
                    state.pop(key, None)
                    continue
                t = saved[key].to(device=p.device, dtype=self._dtype_of(p, key))
                if type(t) is torch.Tensor and t.stride() != p.stride():  # e.g. channels_last
                    t = torch.empty_like(p, dtype=t.dtype).copy_(t)  # the param's layout
                state[key] = t
        self._tables.clear()

    def _dtype_of(self, p, key):
        if key == "master_param" or self._has_master(p):
            return torch.float32 if key == "master_param" else (self.state_dtype or torch.float32)
        return self.state_dtype or p.dtype

    def _has_master(self, p):
        return self.master_weights and p.dtype in _HALF_DTYPES

    def _init_state(self, p, amsgrad):
        state = self.state[p]
        if not isinstance(state, _ParamState) or state.counter is not self.state.counter:
            state = self.state[p] = _ParamState(state)  # copied in from another state dict
        if len(state) == 0:
            # the step counter lives on the param's device, as in torch's fused/capturable modes:
            # kernels read and increment it without a host sync
            state["step"] = torch.zeros((), dtype=torch.float32, device=_local(p).device)
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = torch.zeros_like(p, dtype=self._dtype_of(p, key),
                                              memory_format=torch.preserve_format)
        if self._has_master(p) and "master_param" not in state:  # also after a load without
            state["master_param"] = p.detach().float().clone()
        step = state["step"]
        device = _local(p).device
        if not (isinstance(step, torch.Tensor) and step.dtype == torch.float32
                and step.device == device):  # torch's (CPU), an old number, or the user's
            step = step if isinstance(step, torch.Tensor) else torch.tensor(float(step))
            state["step"] = step.to(device, torch.float32)
        if amsgrad and "max_exp_avg_sq" not in state:  # amsgrad may be switched on mid-run
            state["max_exp_avg_sq"] = torch.zeros_like(state["exp_avg_sq"])
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        buckets = self._buckets()
        if not buckets:
            return loss
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        inv_scales = {}
        if grad_scale is not None:
            inv = grad_scale.double().reciprocal().float()
            inv_scales = {b.device: inv.to(b.device, non_blocking=True) for b in buckets}
        found_infs = {}
        if found_inf is not None:
            found_infs = {b.device: found_inf.to(b.device, torch.float32, non_blocking=True)
                          for b in buckets}
        if any(_capturing(b.device) for b in buckets):
            _check_capturable(buckets)
        clip64 = self._clip_coefs(buckets, inv_scales) if self.max_grad_norm else {}
        clip32 = {device: coef.float() for device, coef in clip64.items()}

        for b in buckets:
            group = b.group
            beta1, beta2 = (float(x) for x in group["betas"])
            lr = group["lr"]
            if isinstance(lr, torch.Tensor) and (b.device.type == "cpu" or lr.device != b.device
                                                 or b.backend in ("cpu", "torch")):
                lr = float(lr)  # a CPU scalar read (no device sync) or the reference path
            stochastic = (self.stochastic_rounding and not b.has_master
                          and b.param_dtype == torch.bfloat16)
            if stochastic and self.seed is None:  # reproducible under torch.manual_seed
                self.seed = int(torch.randint(0, 2**31 - 1, ()).item())
            _STEP_FNS[b.backend](
                self, b, lr=lr, beta1=beta1, beta2=beta2, eps=float(group["eps"]),
                weight_decay=float(group["weight_decay"]),
                decoupled=group.get("decoupled_weight_decay", self._decoupled),
                amsgrad=group["amsgrad"], maximize=group["maximize"], stochastic=stochastic,
                seed=_bucket_seed(self.seed, b) if stochastic else 0,
                inv_scale=inv_scales.get(b.device),
                found_inf=found_infs.get(b.device),
                clip_coef=(clip64 if b.param_dtype in _DOUBLE_DTYPES else clip32).get(b.device))
        return loss

    def _buckets(self):
        """Params with grads, grouped by (param group, device, dtypes, backend).

        The grouping of each param group is cached: it is rebuilt when the set of params with a
        grad, a param, amsgrad, a write into the optimizer state, or a grad's dtype or layout
        changes; otherwise a step only collects the grads (a fraction of a microsecond per
        tensor)."""
        if type(self.state) is not _State:  # the user assigned a new dict
            self._reset_caches()
        if self._seen[0] is not self.state or self._seen[1] != self.state.counter[0]:
            self._layouts.clear()
            self._generation += 1
        out = []
        for gi, group in enumerate(self.param_groups):
            params = group["params"]
            grads = _grads_of(params)
            present = [g is not None for g in grads]
            cached = self._layouts.get(gi)
            if (cached is None or cached[0] is not group or cached[1] != present
                    or cached[2] != group["amsgrad"]
                    or not all(map(operator.is_, params, cached[3]))  # a param replaced
                    or not all(b.take_grads(grads) for b in cached[4])):
                buckets = self._group_buckets(gi, group)
                for b in buckets:
                    b.take_grads(grads)
                cached = self._layouts[gi] = (group, present, group["amsgrad"], list(params),
                                              buckets)
            out += cached[4]
        self._seen = (self.state, self.state.counter[0])  # after the rebuilds' own writes
        return out

    def _group_buckets(self, gi, group):
        params = group["params"]
        first = {}
        for j, p in enumerate(params):
            i = first.setdefault(id(p), j)
            if i != j:
                raise ValueError(f"fasttrain AdamW: param group {gi} lists the same tensor "
                                 f"twice (params {i} and {j}); a fused step would update it "
                                 "twice at once. List each parameter once.")
        by_key = defaultdict(list)
        for i, p in enumerate(params):
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError("fasttrain AdamW does not support sparse gradients")
            if not (p.is_floating_point() or p.is_complex()):
                raise TypeError(f"fasttrain AdamW updates floating point or complex params, "
                                f"got {p.dtype} (param {i} of group {gi})")
            if p.is_complex() and self.state_dtype is not None:
                raise TypeError(f"fasttrain AdamW: state_dtype={self.state_dtype} is for real "
                                f"params; param {i} of group {gi} is {p.dtype}")
            state = self._init_state(p, group["amsgrad"])
            lp = _local(p)
            _check_state(i, lp, state)
            layout = _layout(lp, [_local(g)] + [_local(state[key]) for key in _STATE_KEYS
                                                 if key in state])
            # sharded DTensors apart: clipping all-reduces their sums of squares, not the others'
            key = (lp.device, lp.dtype, g.dtype, state["exp_avg"].dtype, "master_param" in state,
                   layout, _shard_of(p))
            by_key[key].append((i, p, state))
        buckets = []
        for (device, p_dtype, g_dtype, s_dtype, has_master, layout, _), items in by_key.items():
            backend = self._choose_backend(device, p_dtype, g_dtype, s_dtype, layout is not None,
                                           has_master)
            buckets.append(_Bucket(gi, group, device, p_dtype, g_dtype, s_dtype, has_master,
                                   backend, items, self._generation, layout == "contiguous"))
        return buckets

    def _choose_backend(self, device, p_dtype, g_dtype, s_dtype, flat_ok, has_master):
        stochastic = self.stochastic_rounding and not has_master and p_dtype == torch.bfloat16
        if self.backend is not None:
            if not flat_ok and self.backend != "torch":
                raise RuntimeError(f"fasttrain AdamW: backend {self.backend!r} needs params in "
                                   "one memory format (contiguous, channels_last) with grads and "
                                   "states of the same strides, and not tensor subclasses with "
                                   "__torch_dispatch__; use backend='torch' for others")
            if self.backend == "cuda" and stochastic:
                raise RuntimeError("fasttrain AdamW: the cuda backend has no stochastic "
                                   "rounding; use backend='triton'")
            reason = _dtype_reason(self.backend, p_dtype, g_dtype, s_dtype)
            if reason is not None:
                raise RuntimeError(f"fasttrain AdamW: backend {self.backend!r} {reason}")
            return self.backend
        if not flat_ok:
            _backend.log_once("adamw", "torch", "strided params, or grads or states of other "
                              "strides than their params")
            return "torch"
        if p_dtype not in _FLOAT_DTYPES:
            _backend.log_once("adamw", "torch", f"{p_dtype} params")
            return "torch"
        if device.type == "cuda":
            candidates = ("triton", "cuda")
        elif device.type == "cpu":
            candidates = ("cpu",)
        else:
            candidates = ()
        reasons = []
        for name in candidates:
            reason = _dtype_reason(name, p_dtype, g_dtype, s_dtype) \
                or ("has no stochastic rounding" if name == "cuda" and stochastic else None) \
                or _unavailable_reason(name, device)
            if reason is None:
                _backend.log_once("adamw", name, f"params on {device.type}")
                return name
            reasons.append(f"{name}: {reason}")
        _backend.warn_once("adamw", device.type, "; ".join(reasons) or "unsupported device")
        return "torch"

    def _clip_coefs(self, buckets, inv_scales):
        """Per device: min(1, max_grad_norm / (||unscaled grads|| + 1e-6)), all on the device,
        in fp64 (fp32 for the kernels). The sums of squares are fp64 and unscaled there."""
        sum_sq = None
        sharded_sum_sq = None
        for b in buckets:
            s = _SUM_SQ_FNS[b.backend](self, b)
            if b.device in inv_scales:
                s = s * inv_scales[b.device].double().square()
            if b.sharded:
                sharded_sum_sq = s if sharded_sum_sq is None else sharded_sum_sq + s.to(
                    sharded_sum_sq.device)
            else:
                sum_sq = s if sum_sq is None else sum_sq + s.to(sum_sq.device)
        if sharded_sum_sq is not None:
            import torch.distributed as dist

            group = _shard_group([b for b in buckets if b.sharded])
            dist.all_reduce(sharded_sum_sq, group=group)
            sum_sq = sharded_sum_sq if sum_sq is None else sum_sq + sharded_sum_sq.to(sum_sq.device)
        total_norm = sum_sq.sqrt()
        self.last_grad_norm = total_norm.float()
        coef = torch.clamp(self.max_grad_norm / (total_norm + 1e-6), max=1.0)
        return {b.device: coef.to(b.device, non_blocking=True) for b in buckets}


class Adam(AdamW):
    """Adam with L2 weight decay (added to the gradient). Arguments as ``torch.optim.Adam``."""

    _decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, decoupled_weight_decay=False, **kwargs):
        self._decoupled = bool(decoupled_weight_decay)  # torch.optim.Adam's switch to AdamW
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, **kwargs)


class _Bucket:
    """The tensors of one param group that one backend updates in one call."""

    def __init__(self, group_index, group, device, param_dtype, grad_dtype, state_dtype,
                 has_master, backend, items, generation, contiguous):
        self.contiguous = contiguous  # else dense in another memory format (channels_last)
        self.group_index = group_index
        self.generation = generation
        self.group = group
        self.device = device
        self.param_dtype = param_dtype
        self.grad_dtype = grad_dtype
        self.state_dtype = state_dtype
        self.has_master = has_master
        self.backend = backend
        self.indices = [i for i, _, _ in items]
        self.dparams = [p for _, p, _ in items]
        self.params = [_local(p) for p in self.dparams]
        self.grads = None  # set by take_grads() before each step (a new list each time)
        self._table_for = self._table = None  # the grads list table() last returned a table for
        states = [s for _, _, s in items]
        self.exp_avgs = [_local(s["exp_avg"]) for s in states]
        self.exp_avg_sqs = [_local(s["exp_avg_sq"]) for s in states]
        self.max_exp_avg_sqs = [_local(s["max_exp_avg_sq"]) for s in states] \
            if group["amsgrad"] else []
        self.masters = [_local(s["master_param"]) for s in states] if has_master else []
        self.steps = [s["step"] for s in states]
        self.has_dtensor = any(DTensor is not None and isinstance(p, DTensor) for p in self.dparams)
        self.shard = _shard_of(self.dparams[0])  # the same for all (the bucket key)
        self.sharded = bool(self.shard)
        # the local tensors the bucket holds views of: FSDP2 swaps a param's local tensor (e.g.
        # on load_state_dict), which must regroup, not update the old one
        self._locals = [getattr(p, "_local_tensor", None) for p in self.dparams] \
            if self.has_dtensor else None
        # the data pointers and sizes of the params and states: one that changed is a tensor
        # replaced under the same object (p.data = ...), which makes the optimizer regroup
        self._fixed = _data_ptrs(self._fixed_lists()) if backend != "torch" else None

    def _fixed_lists(self):
        if self.backend == "cpu":  # its C++ checks every tensor it gets: the params suffice
            return (self.params,)
        return (self.params, self.exp_avgs, self.exp_avg_sqs, self.max_exp_avg_sqs,
                self.masters, self.steps)

    def take_grads(self, grads):
        """Take this bucket's grads from the group's list of grads; False when one does not fit
        the bucket any more (another dtype or layout), which makes the optimizer regroup."""
        # all the group's params (then in order) or some
        mine = grads if len(self.indices) == len(grads) else [grads[i] for i in self.indices]
        if self.has_dtensor:
            mine = list(mine)  # written below
            if not all(map(operator.is_, (getattr(p, "_local_tensor", None)
                                          for p in self.dparams), self._locals)):
                return False
            for k, (p, g) in enumerate(zip(self.dparams, mine)):
                if isinstance(g, DTensor) and g.placements != p.placements:
                    # e.g. a Partial grad: placed as its param (a collective), as DTensor's
                    # own ops would before the update; .grad holds the result
                    mine[k] = p.grad = g.redistribute(p.device_mesh, p.placements)
            mine = [_local(g) for g in mine]
        dtype, fused = self.grad_dtype, self.backend != "torch"
        module = _ext.loaded()
        if module is not None and (self.contiguous or not fused):  # ~0.2 us less a tensor
            if not module.grads_fit(mine, dtype, fused):
                return False
        elif fused and not self.contiguous:  # the kernels' flat order: the params' strides
            for g, p in zip(mine, self.params):
                if (g.dtype != dtype or g.layout != torch.strided or g.stride() != p.stride()
                        or _in_python(g)):
                    return False
        else:
            for g in mine:
                if (g.dtype != dtype or g.layout != torch.strided
                        or (fused and (not g.is_contiguous() or _in_python(g)))):
                    return False
        if fused and _data_ptrs(self._fixed_lists()) != self._fixed:
            return False  # p.data = ... (another dtype, size or layout?): the grouping judges
        self.grads = mine
        return True

    def mark_written(self, grads):
        """Bump the autograd version counters of what a kernel wrote through raw pointers (the
        grads too if it wrote them back unscaled), as the dispatcher does for in-place ops (so
        a param saved for backward is caught)."""
        lists = (self.params, self.exp_avgs, self.exp_avg_sqs, self.max_exp_avg_sqs,
                 self.masters, self.steps) + ((self.grads,) if grads else ())
        module = _ext.loaded()
        if module is not None:  # on all threads: ~20 ns a tensor, against ~60
            module.bump_versions(*lists)
        else:
            torch.autograd.graph.increment_version(list(itertools.chain.from_iterable(lists)))

    def table(self, cache, chunk):
        """The Triton/CUDA device table, rebuilt when the storage of one of its tensors changed
        (states included: `state["exp_avg"].data = ...` swaps it under the same tensor)."""
        from fasttrain.kernels import adamw as kernels

        if self._table_for is self.grads:  # checked already in this step (clipping's sum)
            return self._table
        key = (self.group_index, self.device, self.param_dtype, self.grad_dtype, self.state_dtype,
               self.has_master, self.contiguous, self.shard)
        ptrs = self._fixed + _data_ptrs([self.grads])  # take_grads compared the first part
        hit = cache.get(key)
        if hit is not None and hit[0] == self.generation and hit[1] == ptrs:
            self._table_for, self._table = self.grads, hit[2]
            return hit[2]
        if _capturing(self.device):
            # Its host-to-device copy would be captured, reading a temporary pinned buffer on
            # every replay.
            raise RuntimeError(
                "fasttrain AdamW: the tensors of this step (params, grads or states) are not "
                "those of the last step before the CUDA graph capture, so the device table its "
                "kernels read would have to be built inside the capture. Keep them allocated "
                "across the capture: e.g. zero_grad(set_to_none=False) before capturing, after "
                "a warm-up step that created the grads.")
        built = kernels.build_table(self.params, self.grads, self.exp_avgs, self.exp_avg_sqs,
                                    self.max_exp_avg_sqs, self.masters, self.steps, chunk)
        cache[key] = (self.generation, ptrs, built)
        self._table_for, self._table = self.grads, built
        return built


def _layout(p, others):
    """"contiguous" if p and ``others`` (its grad and states) are; "dense" if p is in another
    memory format (channels_last, channels_last_3d) and the others have its strides, so that
    the kernels can update them all as flat arrays; else None (the torch path)."""
    if any(_in_python(t) for t in [p, *others]):
        return None  # a subclass whose data or metadata live in Python: only its own ops
    if p.is_contiguous() and all(t.is_contiguous() for t in others):
        return "contiguous"
    dense = ((p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last))
             or (p.dim() == 5 and p.is_contiguous(memory_format=torch.channels_last_3d)))
    if dense and all(t.stride() == p.stride() for t in others):
        return "dense"
    return None


def _in_python(t):
    """Whether t is a tensor subclass with __torch_dispatch__ (a wrapper subclass, say)."""
    return type(t) not in _PLAIN and torch._C._dispatch_keys(t).has(torch._C.DispatchKey.Python)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _capturing(device):
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _check_capturable(buckets):
    """Clear errors, before anything is captured, for what a CUDA graph cannot hold."""
    for b in buckets:
        if b.backend == "torch":
            raise RuntimeError(
                f"fasttrain AdamW: {len(b.params)} {b.param_dtype} params of group "
                f"{b.group_index} on {b.device} take the torch reference path (non-contiguous "
                "params, grads or states, or a dtype without a kernel), which reads the step "
                "counts on the host and cannot be captured in a CUDA graph")
        if b.device.type != "cuda":
            raise RuntimeError(
                f"fasttrain AdamW: params of group {b.group_index} are on {b.device}; a CUDA "
                "graph captures CUDA work only (their update would run once, at capture)")
        lr = b.group["lr"]
        if isinstance(lr, torch.Tensor) and lr.device != b.device:
            raise RuntimeError(
                f"fasttrain AdamW: the lr of group {b.group_index} is a tensor on {lr.device}; "
                f"a CUDA graph would freeze its value at capture. Put it on {b.device} (the "
                "params' device) to change it between replays, or pass a number")


def _grads_of(params):
    """[p.grad for p in params]: in C++ when the extension is loaded (~20 ns a tensor, against
    ~70 in Python), unless a TorchFunctionMode, which Python's .grad calls, is active."""
    module = _ext.loaded()
    if module is None or torch._C._is_torch_function_mode_enabled():
        return [p.grad for p in params]
    return module.grads_of(params)


def _data_ptrs(lists):
    """The data pointer and size in bytes of each tensor of ``lists``, comparable with ==: in
    C++ when the extension is built (~25 ns a tensor), else in Python (~150 ns)."""
    module, _ = _ext.load(build=False)
    if module is not None:
        return module.data_ptrs(*lists)
    # the same bytes as the C++ helper's, so that a key survives the extension being loaded
    return array.array("Q", itertools.chain.from_iterable(
        (t.data_ptr(), t.nbytes) for t in itertools.chain.from_iterable(lists))).tobytes()


def _check_state(index, p, state):
    """A clear error for state tensors that do not fit the param (e.g. replaced by hand)."""
    for key in _STATE_KEYS:
        t = state.get(key)
        if t is not None and (_local(t).shape != p.shape or t.dtype != (
                torch.float32 if key == "master_param" else state["exp_avg"].dtype)):
            raise RuntimeError(f"fasttrain AdamW: state {key!r} of param {index} has shape "
                               f"{tuple(_local(t).shape)} and dtype {t.dtype}; expected the "
                               f"param's shape {tuple(p.shape)} and the exp_avg dtype "
                               "(float32 for master_param)")


def _dtype_reason(backend, p_dtype, g_dtype, s_dtype):
    """None if ``backend`` updates params of p_dtype with grads of g_dtype and states of
    s_dtype, else why not (the kernels' dtype cases; torch: every floating and complex dtype)."""
    if backend == "torch":
        return None
    if backend == "triton":
        if {p_dtype, g_dtype, s_dtype} <= set(_FLOAT_DTYPES):
            return None
        return (f"has no kernel for {p_dtype} params with {g_dtype} grads and {s_dtype} states "
                f"(each of {', '.join(map(str, _FLOAT_DTYPES))})")
    wide = (torch.float32, torch.bfloat16)
    params = {"cpu": wide, "cuda": _FLOAT_DTYPES}[backend]
    if p_dtype not in params or s_dtype not in wide or g_dtype not in (p_dtype, torch.float32):
        return (f"has no kernel for {p_dtype} params with {g_dtype} grads and {s_dtype} states "
                f"(params {', '.join(map(str, params))}; states float32 or bfloat16; grads the "
                "param dtype or float32)")
    return None


def _unavailable_reason(backend, device):
    if backend == "torch":
        return None
    if backend == "triton":
        return _backend.triton_unavailable_reason(device)
    if backend == "cpu" and device.type != "cpu":
        return "the cpu backend runs CPU tensors only"
    if backend == "cuda" and device.type != "cuda":
        return "the cuda backend runs CUDA tensors only"
    return _backend.ext_unavailable_reason(device)


def _shard_group(buckets):
    meshes = {p.device_mesh for b in buckets for p in b.dparams if isinstance(p, DTensor)}
    if len(meshes) != 1 or next(iter(meshes)).ndim != 1:
        raise NotImplementedError("fasttrain AdamW clipping supports sharded DTensor params on "
                                  "one 1-D device mesh")
    return next(iter(meshes)).get_group()


# ---------------------------------------------------------------------------------------------
# Backends. Each takes the optimizer, a bucket and the scalars, and updates the bucket in place.

def _step_torch(opt, b, *, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize,
                stochastic, seed, inv_scale, found_inf, clip_coef):
    """Reference: torch.optim.AdamW's single-tensor update, op for op (host syncs allowed).
    16-bit tensors are computed in fp32, fp64 ones in fp64, complex ones as their real views
    (as torch does)."""
    if found_inf is not None and found_inf.item() != 0:
        return
    lr = float(lr)
    for i, (param, grad, exp_avg, exp_avg_sq, step_t) in enumerate(
            zip(b.params, b.grads, b.exp_avgs, b.exp_avg_sqs, b.steps)):
        step_t += 1
        step = step_t.item()
        vmax_state = b.max_exp_avg_sqs[i] if amsgrad else None
        if param.is_complex():
            param, grad, exp_avg, exp_avg_sq = map(torch.view_as_real,
                                                   (param, grad, exp_avg, exp_avg_sq))
            vmax_state = None if vmax_state is None else torch.view_as_real(vmax_state)
        dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
        g = grad.to(dtype)
        if inv_scale is not None:
            g = g * inv_scale
            grad.copy_(g)  # the unscaled grads stay in .grad, as torch's fused optimizers do
        if clip_coef is not None:
            g = g * clip_coef
        if maximize:
            g = -g
        p = b.masters[i] if b.has_master else param.to(dtype)
        if decoupled:
            p.mul_(1 - lr * weight_decay)
        elif weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        m, v = exp_avg.to(dtype), exp_avg_sq.to(dtype)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step_size = lr / (1 - beta1 ** step)
        bc2_sqrt = (1 - beta2 ** step) ** 0.5
        if amsgrad:
            vmax = torch.maximum(vmax_state.to(dtype), v)
            vmax_state.copy_(vmax)
            denom = (vmax.sqrt() / bc2_sqrt).add_(eps)
        else:
            denom = (v.sqrt() / bc2_sqrt).add_(eps)
        p.addcdiv_(m, denom, value=-step_size)
        if m is not exp_avg:
            exp_avg.copy_(m)
        if v is not exp_avg_sq:
            exp_avg_sq.copy_(v)
        if p is not param and stochastic:  # noise keyed on (seed, step, tensor), as the kernels'
            gen = torch.Generator(device=param.device)
            gen.manual_seed(_mix(seed, step, i))
            param.copy_(stochastic_round_bf16(p, gen))
        elif p is not param:
            param.copy_(p)


def stochastic_round_bf16(x, generator=None):
    """fp32 -> bf16 rounded up or down with probability proportional to the distance (unbiased)."""
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device,
                          generator=generator)
    bits = (x.view(torch.int32) + noise) & -65536  # clear the 16 low bits
    return bits.view(torch.float32).to(torch.bfloat16)  # exact: low bits are zero


def _sum_sq_torch(opt, b):
    """fp64 sum of squares (the squares of GradScaler-scaled grads can pass the fp32 range)."""
    grads = [torch.view_as_real(g) if g.is_complex() else g for g in b.grads]
    return torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float64)).square().sum()


def _step_triton(opt, b, *, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize,
                 stochastic, seed, inv_scale, found_inf, clip_coef):
    from fasttrain.kernels import adamw as kernels

    chunk, block, num_warps = kernels.launch_config(_backend.interpret_mode())
    table, n_tensors, n_chunks, aligned = b.table(opt._tables, chunk)
    kernels.adamw_step(table, n_tensors, n_chunks, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                       weight_decay=weight_decay, param_dtype=b.param_dtype,
                       grad_dtype=b.grad_dtype, state_dtype=b.state_dtype, decoupled=decoupled,
                       amsgrad=amsgrad, maximize=maximize, has_master=b.has_master,
                       stochastic=stochastic, seed=seed, inv_scale=inv_scale,
                       found_inf=found_inf, clip_coef=clip_coef, aligned=aligned, chunk=chunk,
                       block=block, num_warps=num_warps)
    b.mark_written(grads=inv_scale is not None)


def _sum_sq_triton(opt, b):
    from fasttrain.kernels import adamw as kernels

    chunk, block, num_warps = kernels.launch_config(_backend.interpret_mode())
    table, n_tensors, n_chunks, _ = b.table(opt._tables, chunk)
    partials = torch.empty(n_chunks, dtype=torch.float64, device=b.device)
    kernels.sum_sq(table, n_tensors, n_chunks, partials, grad_dtype=b.grad_dtype, chunk=chunk,
                   block=block, num_warps=num_warps)
    return partials.sum()


def _step_cpu(opt, b, *, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize,
              stochastic, seed, inv_scale, found_inf, clip_coef):
    # The extension's direct binding of torch.ops.fasttrain.adamw_cpu_: same arguments, without
    # the dispatcher's per-tensor conversions (~1 us per tensor).
    _ext.load()[0].adamw_cpu_(
        b.params, b.grads, b.exp_avgs, b.exp_avg_sqs, b.max_exp_avg_sqs, b.masters, b.steps,
        float(lr), beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize, stochastic,
        seed, inv_scale, found_inf, clip_coef)


def _sum_sq_cpu(opt, b):
    return _ext.load()[0].sum_sq_cpu(b.grads)


def _step_cuda(opt, b, *, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize,
               stochastic, seed, inv_scale, found_inf, clip_coef):
    from fasttrain.kernels import adamw as kernels

    chunk, _, _ = kernels.launch_config(False)
    table, n_tensors, n_chunks, _ = b.table(opt._tables, chunk)
    lr_tensor = lr if isinstance(lr, torch.Tensor) else None
    if lr_tensor is not None and lr_tensor.dtype != torch.float32:
        lr_tensor = lr_tensor.float()  # the kernel reads an fp32 lr (torch allows fp64 too)
    torch.ops.fasttrain.adamw_cuda_(
        table, n_tensors, n_chunks, chunk, 0.0 if lr_tensor is not None else float(lr),
        lr_tensor, beta1, beta2, eps, weight_decay, b.param_dtype, b.grad_dtype, b.state_dtype,
        decoupled, amsgrad, maximize, b.has_master, inv_scale, found_inf, clip_coef)
    b.mark_written(grads=inv_scale is not None)


_STEP_FNS = {"torch": _step_torch, "triton": _step_triton, "cpu": _step_cpu, "cuda": _step_cuda}
_SUM_SQ_FNS = {"torch": _sum_sq_torch, "triton": _sum_sq_triton, "cpu": _sum_sq_cpu,
               "cuda": _sum_sq_torch}
