"""mmgrow.models"""
