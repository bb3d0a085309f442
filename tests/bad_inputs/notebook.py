{
 "cells": [],
 "metadata": {},
 "nbformat": 4
}
