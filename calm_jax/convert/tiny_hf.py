"""Tiny random Hugging Face checkpoints of every supported family, made offline.

Used by the parity tests and the README's first command. Needs `torch` and `transformers`
(the `test` extra). The models are small but exercise every convention that matters: GQA with
fewer kv heads than heads, a head dim independent of the width, randomised norm weights (so
Gemma's `1 + w` and sandwich norms show), large initialiser range, sliding windows shorter than
the test sequence, RoPE scaling, q/k norms and biases.
"""

from __future__ import annotations

from typing import Any

FAMILIES = ('llama', 'mistral', 'qwen2', 'qwen3', 'gemma', 'gemma2', 'gemma3_text', 'gemma3')
VOCAB = 97
WINDOW = 4

_COMMON = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
               rms_norm_eps=1e-5, max_position_embeddings=128, pad_token_id=0)

_FAMILY_KWARGS: dict[str, dict[str, Any]] = {
    # Llama 3.1-style RoPE scaling with an original context short enough to matter here.
    'llama': dict(tie_word_embeddings=False, rope_parameters=dict(
        rope_type='llama3', rope_theta=10_000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=16)),
    'mistral': dict(sliding_window=WINDOW, head_dim=16, tie_word_embeddings=False),
    'qwen2': dict(tie_word_embeddings=True, rope_parameters=dict(rope_type='default',
                                                                  rope_theta=1_000_000.0)),
    'qwen3': dict(head_dim=16, tie_word_embeddings=False),
    'gemma': dict(head_dim=16, num_key_value_heads=1, hidden_act='gelu_pytorch_tanh'),
    'gemma2': dict(head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=24,
                   attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
    'gemma3_text': dict(head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=24,
                        layer_types=['sliding_attention', 'full_attention', 'sliding_attention'],
                        rope_parameters={
                            'full_attention': dict(rope_type='linear', factor=8.0,
                                                   rope_theta=1_000_000.0),
                            'sliding_attention': dict(rope_type='default', rope_theta=10_000.0)}),
}
_FAMILY_KWARGS['gemma3'] = _FAMILY_KWARGS['gemma3_text']


def make_model(family: str, seed: int = 0):
  """Returns a tiny random float32 transformers model of `family` (eager attention)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  if family not in FAMILIES:
    raise ValueError(f'Unknown family {family!r}; choose from {FAMILIES}.')
  torch.manual_seed(seed)
  text_kwargs = {**_COMMON, **_FAMILY_KWARGS[family]}
  if family == 'gemma3':
    vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2,
                                             image_size=28, patch_size=14)
    config = transformers.Gemma3Config(
        text_config=transformers.Gemma3TextConfig(**text_kwargs),
        vision_config=vision, mm_tokens_per_image=4, image_token_index=VOCAB - 1,
        boi_token_index=VOCAB - 2, eoi_token_index=VOCAB - 3)
    config._attn_implementation = 'eager'  # pylint: disable=protected-access
    model = transformers.Gemma3ForConditionalGeneration(config)
  else:
    config = transformers.AutoConfig.for_model(family, **text_kwargs)
    config._attn_implementation = 'eager'  # pylint: disable=protected-access
    model = transformers.AutoModelForCausalLM.from_config(config)
  with torch.no_grad():
    for name, param in model.named_parameters():
      if 'norm' in name:  # Random norm weights expose `w` vs `1 + w` and misplaced norms.
        param.uniform_(-0.5, 0.5) if family.startswith('gemma') else param.uniform_(0.5, 1.5)
      elif name.endswith('.bias'):
        param.normal_(0.0, 0.2)
  return model.eval()


def save_model(model, directory: str, dtype: str = 'float32', max_shard_size: str | None = None):
  """Saves `model` as safetensors in `directory` (sharded with an index if `max_shard_size`)."""
  import torch  # pylint: disable=g-import-not-at-top

  if dtype != 'float32':
    model = model.to(getattr(torch, dtype))
  kwargs = {'max_shard_size': max_shard_size} if max_shard_size else {}
  model.save_pretrained(directory, **kwargs)


def reference_logits(model, tokens, attention_mask):
  """Float32 logits [B, T, V] of the transformers model, as numpy."""
  import torch  # pylint: disable=g-import-not-at-top

  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                attention_mask=torch.as_tensor(attention_mask, dtype=torch.long))
  return out.logits.float().numpy()
