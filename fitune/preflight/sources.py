"""Where each rule comes from: shared/error-catalog.md entries (letter and number), plus a few public threads
for the recipe sanity rules, as GitHub URLs."""

from __future__ import annotations

from fitune.preflight.rule import gh

A1_FA2_PRE_AMPERE = gh(
    "Dao-AILab/flash-attention#762",
    "Dao-AILab/flash-attention#579",
    "microsoft/MInference#51",
    "modelscope/ms-swift#1603",
)
A2_FA_HEAD_DIM = gh(
    "Dao-AILab/flash-attention#276", "Dao-AILab/flash-attention#328", "hiyouga/LlamaFactory#371"
)
A3_BF16_PRE_AMPERE = gh(
    "tatsu-lab/stanford_alpaca#133", "lm-sys/FastChat#399", "lm-sys/FastChat#1191", "OptimalScale/LMFlow#251"
)
A6_HALF_ON_CPU = gh("yandex-research/DeDLOC#3", "huggingface/transformers#27769", "hiyouga/LlamaFactory#875")
B1_BNB_CUDA = gh(
    "bitsandbytes-foundation/bitsandbytes#156",
    "bitsandbytes-foundation/bitsandbytes#492",
    "bitsandbytes-foundation/bitsandbytes#940",
)
B4_FA2_MISSING = gh("hiyouga/EasyR1#384", "kijai/ComfyUI-Florence2#17")
C1_FA2_FP32 = gh(
    "huggingface/transformers#28052",
    "huggingface/transformers#26066",
    "Dao-AILab/flash-attention#622",
    "QwenLM/Qwen3#406",
)
C2_FA2_OFF_GPU = gh("NousResearch/finetuning-subnet#13", "multimodal-art-projection/YuE#75")
NO_SDPA_PATH = gh(
    "md-mohaiminul/VideoRecap#14", "chflame163/ComfyUI_OmniGen_Wrapper#11", "huggingface/transformers#34282"
)
C4_SOFTCAP = gh(
    "huggingface/transformers#32865", "huggingface/transformers#32309", "hiyouga/LlamaFactory#7387"
)
D1_GC_INPUT_GRADS = gh(
    "huggingface/peft#137", "huggingface/transformers#26377", "locuslab/open-unlearning#178"
)
E2_FP16_OVERFLOW = gh(
    "huggingface/transformers#25065",
    "huggingface/transformers#27212",
    "arielnlee/Platypus#14",
    "huggingface/trl#1173",
)
E4_DTYPE_MIX = gh("huggingface/peft#1515", "tloen/alpaca-lora#203", "hiyouga/LlamaFactory#1303")
E5_HIGH_LR = gh("deepspeedai/DeepSpeedExamples#418", "hiyouga/LlamaFactory#315")
E6_BNB_FP32_COMPUTE = gh("h2oai/h2ogpt#682", "bitsandbytes-foundation/bitsandbytes#2077")
F7_NO_TRAINABLE = gh("huggingface/peft#282", "tloen/alpaca-lora#299", "unslothai/unsloth#241")
F8_TARGETS = gh("hiyouga/LlamaFactory#181", "hiyouga/LlamaFactory#1785", "OptimalScale/LMFlow#125")
F9_KBIT_UPCAST = gh(
    "huggingface/peft#1149", "bitsandbytes-foundation/bitsandbytes#1569", "unslothai/unsloth#633"
)
G1_FSDP_QLORA = gh(
    "huggingface/peft#1432",
    "bitsandbytes-foundation/bitsandbytes#1232",
    "MakazhanAlpamys/Soup#350",
    "axolotl-ai-cloud/axolotl#1482",
)
G6_FSDP_8BIT = gh("oumi-ai/oumi#835", "hiyouga/LlamaFactory#5619", "huggingface/accelerate#1362")
I1_BNB_CPU = gh(
    "bitsandbytes-foundation/bitsandbytes#1226",
    "bitsandbytes-foundation/bitsandbytes#1402",
    "bitsandbytes-foundation/bitsandbytes#1901",
)
K1_OOM = gh("meta-pytorch/torchtune#1185", "mistralai/mistral-finetune#69", "hiyouga/LlamaFactory#4559")
F5_DOES_NOT_FIT = gh("meta-llama/llama-cookbook#56", "meta-llama/llama-cookbook#333")
FSDP2_PUBLIC = gh("pytorch/pytorch#141868")
FSDP2_GRADIENT_SUM = gh("pytorch/pytorch#162338")
FSDP2_UINT8 = gh("pytorch/pytorch#177844", "pytorch/pytorch#185239")
BLACKWELL = gh("pytorch/pytorch#150733", "HybridRobotics/berkeley-humanoid-lite#49")
DEVICE_ORDINAL = gh("HRNet/HRNet-Semantic-Segmentation#171", "yunqing-me/WatermarkDM#8")
CPU_BF16_WITHOUT_AVX512 = gh("pytorch/pytorch#146508", "pytorch/pytorch#86550")
LORA_SCALE = gh("microsoft/LoRA#101", "unslothai/unsloth#1304", "QwenLM/Qwen#785")
LORA_RANK = gh("huggingface/diffusers#4593")
POSITIONS = gh("huggingface/transformers#1726", "Pan-ML/panml#59")
ROPE_CONTEXT = gh("unslothai/unsloth#406", "unslothai/unsloth#25")
CHUNKED_LOSS = gh("huggingface/trl#5575", "meta-pytorch/torchtune#1390", "huggingface/transformers#15466")
EVAL_SPLIT = gh("ml-explore/mlx-examples#236", "huggingface/transformers#22934")
