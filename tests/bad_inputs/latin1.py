# a model
import torch
# café ÿ
class ToyForCausalLM(torch.nn.Module):
    pass
