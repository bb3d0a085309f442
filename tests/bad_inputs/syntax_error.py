import torch

class ToyForCausalLM(torch.nn.Module):
    def forward(self, x):
        return x +
