"""The model room: build the trained module (build.py), fill its weights (weights.py), read
safetensors slices (safetensors_slices.py). Knows no parallel backend: engines describe their
shards through `ShardView`."""
from ftcluster.model.build import (BuiltModule, ParamCounts, TrainModule, apply_peft, build_hf_config, build_meta_model,
                                   build_module, count_params, find_decoder_layers)
from ftcluster.model.safetensors_slices import SafetensorsSlices
from ftcluster.model.weights import (PEFT_PREFIX, LocalSlice, ShardView, hf_key, is_adapter_param, materialize, quantized_full,
                                     source_weight, whole_tensor)

__all__ = ["BuiltModule", "PEFT_PREFIX", "ParamCounts", "SafetensorsSlices", "LocalSlice", "ShardView", "TrainModule",
           "apply_peft", "build_hf_config", "build_meta_model", "build_module", "count_params", "find_decoder_layers",
           "hf_key", "is_adapter_param", "materialize", "quantized_full", "source_weight", "whole_tensor"]
