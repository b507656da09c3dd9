"""Small transformers models built from configs (no downloads) for the tests."""

from typing import Any, Union

import torch
from torch import Tensor

from fairy2i_compile.quantization import quant

Granularity = Union[str, int]


def tiny_llama(seed: int = 0, layers: int = 2, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).to(dtype)


def tiny_gpt2(seed: int = 0, layers: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=96, n_embd=32, n_layer=layers, n_head=4, n_positions=64,
                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


LLAMA_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
GPT2_CONV1DS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


# The eager references of the QAT straight-through quantizers (the package uses the ops in
# ops/quantize.py; these plain autograd Functions check them).
class PhaseQuantSTE(torch.autograd.Function):
    """Whole T-stage PhaseQuant of (U, W) with a straight-through (identity) backward.

    forward(u_re, u_im, w_re, w_im [n, m], stages, granularity)
        -> quantize_widely(...) (4 tensors, input dtypes)
    backward: each upstream gradient passes unchanged to its input.
    """

    @staticmethod
    def forward(ctx: Any, u_re: Tensor, u_im: Tensor, w_re: Tensor, w_im: Tensor,
                stages: int, granularity: Granularity) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return quant.quantize_widely(u_re, u_im, w_re, w_im, stages, granularity)

    @staticmethod
    def backward(ctx: Any, g_ur: Tensor, g_ui: Tensor, g_wr: Tensor, g_wi: Tensor):  # type: ignore[override]
        return g_ur, g_ui, g_wr, g_wi, None, None


class RealQuantSTE(torch.autograd.Function):
    """Real binary / ternary quantization of A [out, in] with identity backward.

    forward(a, method, stages, granularity) -> real_quant(...) cast to a.dtype.
    """

    @staticmethod
    def forward(ctx: Any, a: Tensor, method: str, stages: int, granularity: Granularity) -> Tensor:
        return quant.real_quant(a, method, stages, granularity).to(a.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor):  # type: ignore[override]
        return grad, None, None, None


BOS, EOS = 0, 1  # ids of the special tokens in the local tokenizers below


def bpe_tokenizer(template: bool):
    """A small byte-level BPE (vocabulary 300) built offline; ``template`` adds ``<bos>`` before every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<bos>", "<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Question: Which is the answer? The quick brown fox jumps over the lazy dog."], trainer)
    assert tok.token_to_id("<bos>") == BOS
    if template:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", BOS)])
    return tok


def hf_tokenizer(add_bos_token: bool):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=bpe_tokenizer(template=False), bos_token="<bos>",
                                   eos_token="<eos>", add_bos_token=add_bos_token)
