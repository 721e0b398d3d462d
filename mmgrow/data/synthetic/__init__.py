"""mmgrow.data.synthetic"""
