"""The file MLflow logs as a vidtune version's model code ("models from code": no pickle); see
`vidtune.evaluation.pyfunc`."""

import mlflow

from vidtune.evaluation.pyfunc import VideoPipelineModel

mlflow.models.set_model(VideoPipelineModel())
