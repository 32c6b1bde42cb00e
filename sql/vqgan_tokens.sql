-- Every image's tokens for one VQ-GAN id (the parameter). Read whole by tasks.tokens.TokenStore.
SELECT dicom_id, tokens
FROM tokens
WHERE vqgan_id = ?
