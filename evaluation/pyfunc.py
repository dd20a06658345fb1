"""A pyfunc wrapper so a fully fine-tuned pipeline folder can be an MLflow model version like an adapter."""

from __future__ import annotations

import mlflow.pyfunc


class DiffusersFolderModel(mlflow.pyfunc.PythonModel):
    """Holds a diffusers pipeline folder (artifact `pipeline`); `predict` takes prompts, returns frame arrays."""

    def load_context(self, context) -> None:
        from diffusers import DiffusionPipeline

        self.pipe = DiffusionPipeline.from_pretrained(context.artifacts["pipeline"])

    def predict(self, context, model_input, params=None):
        prompts = (
            list(model_input["prompt"])
            if hasattr(model_input, "__getitem__") and not isinstance(model_input, str)
            else [model_input]
        )
        return [self.pipe(prompt=p, output_type="np", **(params or {})).frames[0] for p in prompts]
