"""mmgrow.tokenizers"""
