"""QUANTIZATION=int8 on a tiny random GPT-2: the int8 product equals its dequantized definition, the model
stays close to float32, batched equals alone, and prompt scoring is refused (its scores would not be exact).
"""

import pytest
import torch

from service.config import ConfigError, ServiceConfig
from service.engine import Engine, EngineConfig, EngineRequest, SamplingParams, SchedulerConfig, Unsupported
from service.model import BatchLayout, KVCache, kernels
from service.model.linear import ACTIVATION_ZERO_POINT, KernelChoice, Linear, quantize_rows, quantize_weight
from tests.engine.test_engine import GREEDY, random_prompts, run_all

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="int8 needs torch's oneDNN")
INT8 = KernelChoice("int8", "int8")


def int8_engine(loaded, quantization="int8", **sched):
    cfg = loaded.model.cfg
    scheduler = SchedulerConfig(**{"max_num_seqs": 32, "max_num_batched_tokens": 64, **sched})
    kv_bytes = 4096 * KVCache.bytes_per_token(cfg, loaded.dtype)
    return Engine(loaded, EngineConfig(scheduler, kv_bytes, 4, seed=0, quantization=quantization))


def test_quantized_rows_are_within_half_a_step():
    x = torch.randn(7, 50) * torch.logspace(-3, 2, 7)[:, None]  # rows of very different ranges
    q, scale = quantize_rows(x)
    assert q.dtype == torch.uint8 and scale.shape == (7, 1)
    back = (q.float() - ACTIVATION_ZERO_POINT) * scale
    assert ((back - x).abs() <= scale / 2 * (1 + 1e-5)).all()
    assert (q.float() - ACTIVATION_ZERO_POINT).abs().amax(1).eq(127).all()  # each row uses its whole range


@pytest.mark.parametrize("rows", [1, 3, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_equals_its_dequantized_definition(rows, dtype):
    """oneDNN's int8 product, rescaled, biased, activated and added, against the same arithmetic on the
    dequantized operands in float64: only float rounding apart."""
    torch.manual_seed(0)
    m = Linear(96, 80).to(dtype)
    m.bias.data.normal_()
    x, residual = torch.randn(rows, 96, dtype=dtype), torch.randn(rows, 80, dtype=dtype)
    m.use(INT8)
    got = m(x, activation="gelu_new", residual=residual).double()

    w = quantize_weight(m.weight)
    wq = torch.round(m.weight.double() / w.scales.double()[:, None])
    q, scale = quantize_rows(x)
    product = ((q.double() - ACTIVATION_ZERO_POINT) @ wq.t()) * w.scales.double() * scale.double()
    expected = torch.nn.functional.gelu(product + m.bias.double(), approximate="tanh") + residual.double()
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    assert (got - expected).abs().max() <= tolerance * expected.abs().max()


@pytest.mark.parametrize("rows", [1, 2, 40])  # the compiled kernel's own product below 3 rows, oneDNN's above
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_int8_linear_equals_its_twin(rows, dtype):
    if kernels.int8_linear() is None:
        pytest.skip("no C++ compiler here: the twin serves alone")
    torch.manual_seed(1)
    m = Linear(200, 72).to(dtype)  # widths that are not multiples of the vector lengths
    m.bias.data.normal_()
    x, residual = torch.randn(rows, 200, dtype=dtype) * 4, torch.randn(rows, 72, dtype=dtype)
    for activation, add in [(None, None), ("gelu_new", None), (None, residual), ("gelu", None), ("silu", residual)]:
        m.use(INT8)
        twin = m(x, activation=activation, residual=add).float()
        m.use(KernelChoice("int8", "int8", compiled=True))
        assert m._packed.compiled is not None
        got = m(x, activation=activation, residual=add)
        assert got.dtype == dtype and got.shape == (rows, 72)
        assert (got.float() - twin).abs().max() <= 1e-5 * twin.abs().max(), activation


def test_int8_model_stays_close_to_float32(tiny):
    loaded, _ = tiny
    model, vocab = loaded.model, loaded.model.cfg.vocab_size
    ids = torch.tensor(random_prompts(1, vocab, 11, 40, 40)[0])
    layout = BatchLayout.prefill([len(ids)])

    def logits(quantization):
        model.prepare_kernels(quantization=quantization)
        with torch.inference_mode():
            return model.compute_logits(model(ids, layout.positions(), layout)).double()

    try:
        exact, int8 = logits("none"), logits("int8")
    finally:
        model.prepare_kernels()
    assert not torch.equal(exact, int8)  # the int8 path did run
    assert (int8 - exact).abs().max() <= 0.05 * exact.abs().max()
    kl = torch.nn.functional.kl_div(int8.log_softmax(-1), exact.log_softmax(-1), log_target=True, reduction="none")
    assert kl.sum(-1).mean() < 1e-2


def test_int8_greedy_alone_equals_inside_a_batch(tiny):
    """Each activation row has its own scale, so a request's numbers do not depend on its batch."""
    loaded, _ = tiny
    vocab = loaded.model.cfg.vocab_size
    target = random_prompts(1, vocab, 2, 30, 30)[0]
    try:
        alone = run_all(int8_engine(loaded), {0: [("t", target, GREEDY)]})["t"]
        arrivals = {i % 3: [] for i in range(3)}
        for i, p in enumerate(random_prompts(16, vocab, 3)):
            arrivals[i % 3].append((f"o{i}", p, GREEDY))
        arrivals[1].append(("t", target, GREEDY))
        batched = run_all(int8_engine(loaded), arrivals)["t"]
    finally:
        loaded.model.prepare_kernels()
    assert batched[0] == alone[0] and len(alone[0]) == GREEDY.max_tokens


def test_prompt_scoring_is_refused_under_int8(tiny):
    loaded, _ = tiny
    engine = int8_engine(loaded)
    try:
        with pytest.raises(Unsupported, match="QUANTIZATION=int8"):
            engine.add(EngineRequest("s", [1, 2, 3], SamplingParams(max_tokens=0, prompt_logprobs=0)))
        with pytest.raises(Unsupported):
            engine.add(EngineRequest("e", [1, 2, 3], SamplingParams(max_tokens=4, prompt_logprobs=1)))
        assert not engine.has_work and not engine.requests and not engine.scores_exact
        engine.add(EngineRequest("g", [1, 2, 3], SamplingParams(max_tokens=2, logprobs=2)))  # generation is fine
        assert engine.has_work
    finally:
        loaded.model.prepare_kernels()


def test_quantization_configuration():
    assert ServiceConfig.from_env({}).engine_config(64).quantization == "none"
    assert ServiceConfig.from_env({"QUANTIZATION": "int8"}).engine_config(64).quantization == "int8"
    with pytest.raises(ConfigError, match="^QUANTIZATION="):
        ServiceConfig.from_env({"QUANTIZATION": "int4"})
    with pytest.raises(ConfigError, match="^QUANTIZATION=int8 runs on CPU only"):
        ServiceConfig.from_env({"QUANTIZATION": "int8", "DEVICE": "cuda"})
