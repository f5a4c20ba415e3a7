"""The challenge's reference metric, shared by the scoring and workflow tests."""


def reference_evaluate(model_id: str, folder: str) -> float:
    """The challenge's evaluation code, verbatim except the model path and device."""
    device = "cpu"
    import torch, os
    from PIL import Image
    from transformers import CLIPProcessor
    from aesthetics_predictor import AestheticsPredictorV2Linear
    predictor = AestheticsPredictorV2Linear.from_pretrained(model_id)
    processor = CLIPProcessor.from_pretrained(model_id)
    def get_aesthetics_score(image):
        inputs = processor(images=image, return_tensors="pt")
        inputs = {k: v.to(device) for k, v in inputs.items()}
        with torch.no_grad():
            outputs = predictor(**inputs)
        prediction = outputs.logits
        return prediction.tolist()[0][0]
    def evaluate(folder):
        scores = []
        for file_name in os.listdir(folder):
            if os.path.isfile(os.path.join(folder, file_name)):
                image = Image.open(os.path.join(folder, file_name))
                scores.append(get_aesthetics_score(image))
        if len(scores) == 0:
            return 0
        else:
            return sum(scores) / len(scores)
    return evaluate(folder)
