"""mmgrow.layers"""
