"""E4T Embedding Plot: ‖w − e_domain‖ over the timesteps of the last sampling run (paper fig. 7)."""
from ..e4t import line_plot
from .refine import refine_state


class E4TEmbeddingPlot:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "the MODEL from Apply E4T or E4T Personalize that was sampled"}),
            "samples": ("LATENT", {"tooltip": "the sampler's output, so the plot is drawn after sampling"}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "plot"
    CATEGORY = "E4T"
    DESCRIPTION = "Plots how far the predicted word embedding is from the domain word at each sampling step."

    def plot(self, model, samples):
        state = refine_state(model)
        if state is None or state.refinement is None or not state.refinement.history:
            raise ValueError("E4T Embedding Plot: this MODEL has not sampled an E4T prompt yet; connect the MODEL "
                             "that went into the sampler and the sampler's LATENT output")
        history = state.refinement.history
        plot = line_plot([t for t, _ in history], [n for _, n in history], "‖w − e_domain‖ per sampling step",
                         "timestep", "norm")
        return (plot[None],)
