"""mmgrow.evaluation"""
