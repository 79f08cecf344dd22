"""Tiny random models and batches for tests: built from a small config, no download."""
from __future__ import annotations

import torch
from transformers import (BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM, RobertaConfig,
                          RobertaForMaskedLM)

from iit_fast.models import IntervenableMLM
from iit_fast.models.student import init_student_from_teacher


ENCODER_NORMS = ("LayerNorm", "layer_norm")  # BERT / RoBERTa, DistilBERT
DECODER_NORMS = ("ln_", "norm")               # GPT-2's ln_*, Llama's *norm (and q/k/v biases of Qwen2)


def _jitter_(model, norms=ENCODER_NORMS):
    # random, non-trivial biases and norm gains so the tests see all the parameters at work
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(n in name for n in norms) or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def tiny_bert(layers: int = 4, hidden: int = 32, heads: int = 4, vocab: int = 97, seed: int = 0,
              max_pos: int = 64) -> BertForMaskedLM:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=2 * hidden, max_position_embeddings=max_pos,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager")
    return _jitter_(BertForMaskedLM(cfg).eval())


def tiny_roberta(layers: int = 4, hidden: int = 32, heads: int = 4, vocab: int = 97, seed: int = 0,
                 max_pos: int = 64) -> RobertaForMaskedLM:
    torch.manual_seed(seed)
    cfg = RobertaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=2 * hidden, max_position_embeddings=max_pos + 2, pad_token_id=1,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager")
    return _jitter_(RobertaForMaskedLM(cfg).eval())


def tiny_distilbert(layers: int = 4, hidden: int = 32, heads: int = 4, vocab: int = 97, seed: int = 0,
                    max_pos: int = 64) -> DistilBertForMaskedLM:
    torch.manual_seed(seed)
    cfg = DistilBertConfig(vocab_size=vocab, dim=hidden, n_layers=layers, n_heads=heads, hidden_dim=2 * hidden,
                           max_position_embeddings=max_pos, dropout=0.0, attention_dropout=0.0,
                           attn_implementation="eager")
    return _jitter_(DistilBertForMaskedLM(cfg).eval())


TINY = {"bert": tiny_bert, "roberta": tiny_roberta, "distilbert": tiny_distilbert}


def tiny_gpt2(layers: int = 4, hidden: int = 32, heads: int = 4, vocab: int = 101, seed: int = 0,
              max_pos: int = 64, tied: bool = True):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_pos,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tied, bos_token_id=5,
                     eos_token_id=5,
                     attn_implementation="eager")
    return _jitter_(GPT2LMHeadModel(cfg).eval(), DECODER_NORMS)


def _llama_like(config_cls, model_cls, layers, hidden, heads, kv_heads, vocab, seed, max_pos, tied, **kw):
    torch.manual_seed(seed)
    cfg = config_cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden // 2 + 1,
                     num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                     max_position_embeddings=max_pos, tie_word_embeddings=tied, attention_dropout=0.0,
                     attn_implementation="eager", **kw)
    return _jitter_(model_cls(cfg).eval(), DECODER_NORMS)


def tiny_llama(layers: int = 4, hidden: int = 32, heads: int = 4, vocab: int = 101, seed: int = 0,
               max_pos: int = 64, tied: bool = False, kv_heads: int = 2):
    """GQA (kv_heads < heads), untied lm_head by default, attention biases on (Llama's option)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    return _llama_like(LlamaConfig, LlamaForCausalLM, layers, hidden, heads, kv_heads, vocab, seed, max_pos,
                       tied, attention_bias=True)


def tiny_qwen2(layers: int = 4, hidden: int = 32, heads: int = 4, vocab: int = 101, seed: int = 0,
               max_pos: int = 64, tied: bool = True, kv_heads: int = 2, window: int | None = 4):
    """Qwen2 with q/k/v biases; with `window`, layers from the second on use sliding-window attention."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    extra = dict(use_sliding_window=True, sliding_window=window, max_window_layers=1) if window else {}
    return _llama_like(Qwen2Config, Qwen2ForCausalLM, layers, hidden, heads, kv_heads, vocab, seed, max_pos,
                       tied, **extra)


def tiny_mistral(layers: int = 4, hidden: int = 32, heads: int = 4, vocab: int = 101, seed: int = 0,
                 max_pos: int = 64, tied: bool = False, kv_heads: int = 1, window: int | None = 5):
    """Mistral: multi-query attention (1 kv head) and a sliding window on every layer."""
    from transformers import MistralConfig, MistralForCausalLM
    return _llama_like(MistralConfig, MistralForCausalLM, layers, hidden, heads, kv_heads, vocab, seed, max_pos,
                       tied, sliding_window=window)


TINY_CAUSAL = {"gpt2": tiny_gpt2, "llama": tiny_llama, "qwen2": tiny_qwen2, "mistral": tiny_mistral}


def tiny_causal_batch(lengths=(9, 5, 7, 3), vocab=101, seed=0, left=False):
    """Padded batch of random token ids (pad id 0) with its attention mask; right padding, or left with `left`."""
    g = torch.Generator().manual_seed(seed)
    S, B = max(lengths), len(lengths)
    ids = torch.zeros(B, S, dtype=torch.long)
    am = torch.zeros(B, S, dtype=torch.long)
    for i, n in enumerate(lengths):
        cols = slice(S - n, S) if left else slice(0, n)
        ids[i, cols] = torch.randint(6, vocab, (n,), generator=g)
        am[i, cols] = 1
    return {"input_ids": ids, "attention_mask": am}


def tiny_words(vocab: int) -> list[str]:
    """A vocabulary of `vocab` entries: the special tokens both tokenizer kinds use, then made-up words."""
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<|endoftext|>"]
    return special + [f"w{i}" for i in range(vocab - len(special))]


def tiny_bert_tokenizer(vocab: int = 97, shuffle_seed: int | None = None):
    """A BERT tokenizer of exactly `vocab` tokens ([PAD] 0, [UNK], [CLS], [SEP], [MASK], then words; the words
    in another order with `shuffle_seed`)."""
    from transformers import BertTokenizerFast
    words = tiny_words(vocab)
    if shuffle_seed is not None:
        order = torch.randperm(vocab - 6, generator=torch.Generator().manual_seed(shuffle_seed)).tolist()
        words = words[:6] + [words[6 + i] for i in order]
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=False)


def tiny_causal_tokenizer(vocab: int = 101):
    """A word-level tokenizer of `vocab` tokens with <|endoftext|> as bos/eos and no pad token (as GPT-2's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = tiny_words(vocab)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>")


def tiny_pair(teacher_layers=4, student_layers=2, hidden=32, vocab=97, seed=0, family="bert"):
    teacher = TINY[family](teacher_layers, hidden, vocab=vocab, seed=seed)
    student = init_student_from_teacher(teacher, student_layers)
    with torch.no_grad():  # make the student differ from a copy, so every loss is non-zero
        for p in student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return IntervenableMLM(teacher).eval(), IntervenableMLM(student).train()


def tiny_batch(lengths=(9, 5, 7, 3), seq=None, vocab=97, seed=0, mask_prob=0.3):
    """Right-padded batch with MLM labels on some real tokens (at least one per row)."""
    g = torch.Generator().manual_seed(seed)
    seq = seq or max(lengths)
    B = len(lengths)
    ids = torch.randint(5, vocab, (B, seq), generator=g)
    am = torch.zeros(B, seq, dtype=torch.long)
    labels = torch.full((B, seq), -100, dtype=torch.long)
    for i, n in enumerate(lengths):
        am[i, :n] = 1
        ids[i, n:] = 0
        chosen = torch.rand(n, generator=g) < mask_prob
        chosen[int(torch.randint(n, (1,), generator=g))] = True
        labels[i, :n][chosen] = ids[i, :n][chosen]
        ids[i, :n][chosen] = 4  # a stand-in [MASK]
    return {"input_ids": ids, "attention_mask": am, "labels": labels,
            "token_type_ids": torch.zeros_like(ids)}
