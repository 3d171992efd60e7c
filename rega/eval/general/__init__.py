"""General ability without a judge: multiple choice by log-likelihood and drift from the base model."""
