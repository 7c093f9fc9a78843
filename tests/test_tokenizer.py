from sdlora.models.tokenizer import BOS_ID, EOS_ID, clip_tokenizer


def test_known_ids_and_length():
    tok = clip_tokenizer()
    assert tok.model_max_length == 77
    assert tok.convert_tokens_to_ids("<|startoftext|>") == BOS_ID == 49406
    assert tok.convert_tokens_to_ids("<|endoftext|>") == EOS_ID == 49407
    assert len(tok) == 49408
    # Ids of openai/clip-vit-large-patch14 for this prompt.
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    ids = tok("word " * 200, padding="max_length", truncation=True).input_ids
    assert len(ids) == 77 and ids[-1] == EOS_ID


def test_tiny_model_folder_loads_in_plain_diffusers(tiny_model_dir):
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    assert pipe.tokenizer.model_max_length == 77
    img = pipe("a red circle", num_inference_steps=2, height=32, width=32,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert img.shape == (1, 32, 32, 3)
